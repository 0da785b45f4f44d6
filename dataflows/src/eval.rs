//! Evaluation of type-checked filter expressions on rows, without allocating: values borrow
//! strings from the row, integers widen to i128 (so u64 and i64 compare exactly), and an
//! operation on null, an overflow or a division by zero yields null, which a filter treats as
//! false.

use std::cmp::Ordering;

use sundial_protocol::plan::{BinOp, Expr, Literal};
use sundial_protocol::value::Datum;

use crate::row::Row;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Val<'a> {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a str),
}

fn datum(d: &Datum) -> Val<'_> {
    match d {
        Datum::Null => Val::Null,
        Datum::Bool(b) => Val::Bool(*b),
        Datum::Int(i) => Val::Int(i128::from(*i)),
        Datum::UInt(u) => Val::Int(i128::from(*u)),
        Datum::Float(f) => Val::Float(f.0),
        Datum::Str(s) => Val::Str(s),
    }
}

fn literal(l: &Literal) -> Val<'_> {
    match l {
        Literal::Null => Val::Null,
        Literal::Bool(b) => Val::Bool(*b),
        Literal::Int(i) => Val::Int(i128::from(*i)),
        Literal::Float(f) => Val::Float(*f),
        Literal::Str(s) => Val::Str(s),
    }
}

fn compare(a: Val<'_>, b: Val<'_>) -> Option<Ordering> {
    match (a, b) {
        (Val::Int(x), Val::Int(y)) => Some(x.cmp(&y)),
        (Val::Int(x), Val::Float(y)) => (x as f64).partial_cmp(&y),
        (Val::Float(x), Val::Int(y)) => x.partial_cmp(&(y as f64)),
        (Val::Float(x), Val::Float(y)) => x.partial_cmp(&y),
        (Val::Str(x), Val::Str(y)) => Some(x.cmp(y)),
        (Val::Bool(x), Val::Bool(y)) => Some(x.cmp(&y)),
        _ => None,
    }
}

fn arith(op: BinOp, a: Val<'_>, b: Val<'_>) -> Val<'static> {
    match (a, b) {
        (Val::Int(x), Val::Int(y)) => {
            let r = match op {
                BinOp::Add => x.checked_add(y),
                BinOp::Sub => x.checked_sub(y),
                BinOp::Mul => x.checked_mul(y),
                BinOp::Div => x.checked_div(y),
                BinOp::Rem => x.checked_rem(y),
                _ => None,
            };
            r.map_or(Val::Null, Val::Int)
        }
        (Val::Int(_) | Val::Float(_), Val::Int(_) | Val::Float(_)) => {
            let f = |v| match v {
                Val::Int(i) => i as f64,
                Val::Float(f) => f,
                _ => f64::NAN,
            };
            let (x, y) = (f(a), f(b));
            let r = match op {
                BinOp::Add => x + y,
                BinOp::Sub => x - y,
                BinOp::Mul => x * y,
                BinOp::Div => x / y,
                BinOp::Rem => x % y,
                _ => f64::NAN,
            };
            if r.is_finite() {
                Val::Float(r)
            } else {
                Val::Null
            }
        }
        _ => Val::Null,
    }
}

fn eval<'a>(e: &'a Expr, row: &'a Row) -> Val<'a> {
    match e {
        Expr::Field(i) => row.values.get(*i).map_or(Val::Null, datum),
        Expr::Lit(l) => literal(l),
        Expr::Not(inner) => match eval(inner, row) {
            Val::Bool(b) => Val::Bool(!b),
            _ => Val::Null,
        },
        Expr::Neg(inner) => match eval(inner, row) {
            Val::Int(i) => Val::Int(-i),
            Val::Float(f) => Val::Float(-f),
            _ => Val::Null,
        },
        Expr::Binary(BinOp::And, l, r) => match eval(l, row) {
            Val::Bool(false) => Val::Bool(false),
            Val::Bool(true) => match eval(r, row) {
                Val::Bool(b) => Val::Bool(b),
                _ => Val::Null,
            },
            _ => match eval(r, row) {
                Val::Bool(false) => Val::Bool(false),
                _ => Val::Null,
            },
        },
        Expr::Binary(BinOp::Or, l, r) => match eval(l, row) {
            Val::Bool(true) => Val::Bool(true),
            Val::Bool(false) => match eval(r, row) {
                Val::Bool(b) => Val::Bool(b),
                _ => Val::Null,
            },
            _ => match eval(r, row) {
                Val::Bool(true) => Val::Bool(true),
                _ => Val::Null,
            },
        },
        Expr::Binary(op @ (BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge), l, r) => {
            match compare(eval(l, row), eval(r, row)) {
                None => Val::Null,
                Some(ord) => Val::Bool(match op {
                    BinOp::Eq => ord == Ordering::Equal,
                    BinOp::Ne => ord != Ordering::Equal,
                    BinOp::Lt => ord == Ordering::Less,
                    BinOp::Le => ord != Ordering::Greater,
                    BinOp::Gt => ord == Ordering::Greater,
                    _ => ord != Ordering::Less,
                }),
            }
        }
        Expr::Binary(op, l, r) => arith(*op, eval(l, row), eval(r, row)),
        Expr::In { expr, list, negated } => {
            let v = eval(expr, row);
            if v == Val::Null {
                return Val::Null;
            }
            let found = list.iter().any(|l| compare(v, literal(l)) == Some(Ordering::Equal));
            Val::Bool(found != *negated)
        }
        Expr::IsNull { expr, negated } => Val::Bool((eval(expr, row) == Val::Null) != *negated),
    }
}

/// True when the row satisfies the filter (null counts as false).
pub fn matches(filter: &Expr, row: &Row) -> bool {
    eval(filter, row) == Val::Bool(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundial_definition::expr::parse_filter;
    use sundial_protocol::plan::SourcePlan;
    use sundial_protocol::value::F64;

    fn source() -> SourcePlan {
        sundial_definition::source_from_json(
            r#"{"name": "tx", "time": "ts", "fields": {"user_id": "u64", "ts": "i64", "amount": "i64",
                "merchant": "string", "score": "f64", "online": "bool"}}"#,
        )
        .unwrap()
    }

    fn row(amount: Option<i64>, merchant: &str, score: f64, online: bool) -> Row {
        Row {
            time: 0,
            values: vec![
                Datum::UInt(u64::MAX),
                Datum::Int(0),
                amount.map_or(Datum::Null, Datum::Int),
                Datum::Str(merchant.into()),
                Datum::Float(F64(score)),
                Datum::Bool(online),
            ]
            .into_boxed_slice(),
        }
    }

    fn check(text: &str, r: &Row) -> bool {
        matches(&parse_filter(text, &source()).unwrap(), r)
    }

    #[test]
    fn evaluates_like_sql() {
        let r = row(Some(150), "shop", 0.5, true);
        assert!(check("amount > 100 and merchant != \"test\"", &r));
        assert!(!check("amount > 100 and merchant == 'shop' and not online", &r));
        assert!(check("amount * 2 - 50 = 250 and amount % 7 = 3", &r));
        assert!(check("score < amount", &r));
        assert!(check("merchant in ('a', 'shop')", &r));
        assert!(check("amount not in (1, 2)", &r));
        assert!(check("user_id > 9223372036854775807", &r), "u64 beyond i64 compares exactly");
        assert!(check("amount / 0 is null", &r));
        assert!(check("merchant >= 'sh' and merchant < 'si'", &r));
        let nulls = row(None, "x", 1.0, false);
        assert!(!check("amount > 1", &nulls));
        assert!(!check("not (amount > 1)", &nulls), "null stays null under not");
        assert!(check("amount > 1 or online = false", &nulls));
        assert!(!check("amount > 1 and online", &nulls));
        assert!(check("amount is null", &nulls));
        assert!(!check("amount in (1)", &nulls) && !check("amount not in (1)", &nulls));
    }
}
