//! The filter language: a hand-written lexer and recursive-descent parser, and a type checker
//! that resolves field names against the source schema.
//!
//! ```text
//! or      := and ("or" and)*
//! and     := not ("and" not)*
//! not     := "not" not | cmp
//! cmp     := add ( ("=="|"="|"!="|"<>"|"<"|"<="|">"|">=") add
//!                | "is" ["not"] "null"
//!                | ["not"] "in" "(" literal ("," literal)* ")" )?
//! add     := mul (("+"|"-") mul)*
//! mul     := unary (("*"|"/"|"%") unary)*
//! unary   := "-" unary | primary
//! primary := integer | float | string | "true" | "false" | "null" | field | "(" or ")"
//! ```
//! Keywords are case-insensitive; strings take double or single quotes with `\` escapes.
//! Comparing with `null` is an error (use `is null`); a null operand at run time makes a
//! comparison false.

use sundial_protocol::plan::{BinOp, Expr, ExprType, FieldType, Literal, SourcePlan};

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Int(i64),
    Float(f64),
    Str(String),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
    End,
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Ident(s) => format!("`{s}`"),
        Tok::Int(i) => format!("`{i}`"),
        Tok::Float(f) => format!("`{f}`"),
        Tok::Str(s) => format!("string {s:?}"),
        Tok::Op(o) => format!("`{o}`"),
        Tok::LParen => "`(`".into(),
        Tok::RParen => "`)`".into(),
        Tok::Comma => "`,`".into(),
        Tok::End => "the end".into(),
    }
}

/// (token, column where it starts, 1-based)
fn lex(text: &str) -> Result<Vec<(Tok, usize)>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let col = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((Tok::Ident(chars[start..i].iter().collect()), col));
            continue;
        }
        if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            let start = i;
            let mut float = false;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            if i < chars.len() && chars[i] == '.' {
                float = true;
                i += 1;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
            }
            if i < chars.len() && (chars[i] == 'e' || chars[i] == 'E') {
                float = true;
                i += 1;
                if i < chars.len() && (chars[i] == '+' || chars[i] == '-') {
                    i += 1;
                }
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
            }
            let s: String = chars[start..i].iter().collect();
            let tok = if float {
                Tok::Float(s.parse().map_err(|_| format!("bad number {s:?} at column {col}"))?)
            } else {
                Tok::Int(s.parse().map_err(|_| format!("integer {s} at column {col} does not fit in 64 bits"))?)
            };
            out.push((tok, col));
            continue;
        }
        if c == '"' || c == '\'' {
            let quote = c;
            i += 1;
            let mut s = String::new();
            loop {
                match chars.get(i) {
                    None => return Err(format!("string starting at column {col} is not closed")),
                    Some(&ch) if ch == quote => {
                        i += 1;
                        break;
                    }
                    Some('\\') => {
                        let esc = chars.get(i + 1).ok_or(format!("string starting at column {col} is not closed"))?;
                        s.push(match esc {
                            'n' => '\n',
                            't' => '\t',
                            other => *other,
                        });
                        i += 2;
                    }
                    Some(&ch) => {
                        s.push(ch);
                        i += 1;
                    }
                }
            }
            out.push((Tok::Str(s), col));
            continue;
        }
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        let op2 = ["==", "!=", "<>", "<=", ">="].into_iter().find(|op| *op == two);
        if let Some(op) = op2 {
            out.push((Tok::Op(op), col));
            i += 2;
            continue;
        }
        let tok = match c {
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            ',' => Tok::Comma,
            '=' => Tok::Op("="),
            '<' => Tok::Op("<"),
            '>' => Tok::Op(">"),
            '+' => Tok::Op("+"),
            '-' => Tok::Op("-"),
            '*' => Tok::Op("*"),
            '/' => Tok::Op("/"),
            '%' => Tok::Op("%"),
            other => return Err(format!("unexpected character {other:?} at column {col}")),
        };
        out.push((tok, col));
        i += 1;
    }
    out.push((Tok::End, chars.len() + 1));
    Ok(out)
}

struct Parser<'a> {
    toks: Vec<(Tok, usize)>,
    pos: usize,
    source: &'a SourcePlan,
}

/// A parsed, typed node.
type Typed = (Expr, ExprType);

const MAX_DEPTH_TOKENS: usize = 10_000;

impl Parser<'_> {
    fn peek(&self) -> &Tok {
        &self.toks[self.pos.min(self.toks.len() - 1)].0
    }

    fn col(&self) -> usize {
        self.toks[self.pos.min(self.toks.len() - 1)].1
    }

    fn bump(&mut self) -> Tok {
        let t = self.peek().clone();
        self.pos += 1;
        t
    }

    fn keyword(&self, kw: &str) -> bool {
        matches!(self.peek(), Tok::Ident(s) if s.eq_ignore_ascii_case(kw))
    }

    fn eat_keyword(&mut self, kw: &str) -> bool {
        if self.keyword(kw) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, want: Tok, what: &str) -> Result<(), String> {
        if *self.peek() == want {
            self.pos += 1;
            Ok(())
        } else {
            Err(format!("expected {what} at column {}, found {}", self.col(), describe(self.peek())))
        }
    }

    fn or(&mut self, depth: usize) -> Result<Typed, String> {
        if depth > 64 {
            return Err("the expression nests too deeply".into());
        }
        let mut left = self.and(depth)?;
        while self.keyword("or") {
            let col = self.col();
            self.pos += 1;
            let right = self.and(depth)?;
            left = logical(BinOp::Or, left, right, col)?;
        }
        Ok(left)
    }

    fn and(&mut self, depth: usize) -> Result<Typed, String> {
        let mut left = self.not(depth)?;
        while self.keyword("and") {
            let col = self.col();
            self.pos += 1;
            let right = self.not(depth)?;
            left = logical(BinOp::And, left, right, col)?;
        }
        Ok(left)
    }

    fn not(&mut self, depth: usize) -> Result<Typed, String> {
        if depth > 64 {
            return Err("the expression nests too deeply".into());
        }
        if self.keyword("not") {
            let col = self.col();
            self.pos += 1;
            let (e, t) = self.not(depth + 1)?;
            if t != ExprType::Bool {
                return Err(format!("`not` at column {col} needs a boolean, got {}", type_name(t)));
            }
            return Ok((Expr::Not(Box::new(e)), ExprType::Bool));
        }
        self.cmp(depth)
    }

    fn cmp(&mut self, depth: usize) -> Result<Typed, String> {
        let left = self.add(depth)?;
        let col = self.col();
        let op = match self.peek() {
            Tok::Op("==") | Tok::Op("=") => Some(BinOp::Eq),
            Tok::Op("!=") | Tok::Op("<>") => Some(BinOp::Ne),
            Tok::Op("<") => Some(BinOp::Lt),
            Tok::Op("<=") => Some(BinOp::Le),
            Tok::Op(">") => Some(BinOp::Gt),
            Tok::Op(">=") => Some(BinOp::Ge),
            _ => None,
        };
        if let Some(op) = op {
            self.pos += 1;
            let right = self.add(depth)?;
            return comparison(op, left, right, col);
        }
        if self.eat_keyword("is") {
            let negated = self.eat_keyword("not");
            if !self.eat_keyword("null") {
                return Err(format!("expected `null` after `is` at column {}", self.col()));
            }
            return Ok((Expr::IsNull { expr: Box::new(left.0), negated }, ExprType::Bool));
        }
        let negated = if self.keyword("not")
            && matches!(self.toks.get(self.pos + 1), Some((Tok::Ident(s), _)) if s.eq_ignore_ascii_case("in"))
        {
            self.pos += 1;
            true
        } else {
            false
        };
        if self.eat_keyword("in") {
            self.expect(Tok::LParen, "`(` after `in`")?;
            let mut list = Vec::new();
            loop {
                let lcol = self.col();
                let lit = self.literal()?;
                check_member(left.1, &lit, lcol)?;
                list.push(lit);
                if *self.peek() == Tok::Comma {
                    self.pos += 1;
                    continue;
                }
                self.expect(Tok::RParen, "`,` or `)` in the `in` list")?;
                break;
            }
            return Ok((Expr::In { expr: Box::new(left.0), list, negated }, ExprType::Bool));
        }
        Ok(left)
    }

    fn literal(&mut self) -> Result<Literal, String> {
        let negative = if *self.peek() == Tok::Op("-") {
            self.pos += 1;
            true
        } else {
            false
        };
        let col = self.col();
        let lit = match self.bump() {
            Tok::Int(i) => Literal::Int(if negative { -i } else { i }),
            Tok::Float(f) => Literal::Float(if negative { -f } else { f }),
            Tok::Str(s) if !negative => Literal::Str(s),
            Tok::Ident(s) if !negative && s.eq_ignore_ascii_case("true") => Literal::Bool(true),
            Tok::Ident(s) if !negative && s.eq_ignore_ascii_case("false") => Literal::Bool(false),
            other => return Err(format!("expected a literal at column {col}, found {}", describe(&other))),
        };
        Ok(lit)
    }

    fn add(&mut self, depth: usize) -> Result<Typed, String> {
        let mut left = self.mul(depth)?;
        loop {
            let op = match self.peek() {
                Tok::Op("+") => BinOp::Add,
                Tok::Op("-") => BinOp::Sub,
                _ => return Ok(left),
            };
            let col = self.col();
            self.pos += 1;
            let right = self.mul(depth)?;
            left = arithmetic(op, left, right, col)?;
        }
    }

    fn mul(&mut self, depth: usize) -> Result<Typed, String> {
        let mut left = self.unary(depth)?;
        loop {
            let op = match self.peek() {
                Tok::Op("*") => BinOp::Mul,
                Tok::Op("/") => BinOp::Div,
                Tok::Op("%") => BinOp::Rem,
                _ => return Ok(left),
            };
            let col = self.col();
            self.pos += 1;
            let right = self.unary(depth)?;
            left = arithmetic(op, left, right, col)?;
        }
    }

    fn unary(&mut self, depth: usize) -> Result<Typed, String> {
        if depth > 64 {
            return Err("the expression nests too deeply".into());
        }
        if *self.peek() == Tok::Op("-") {
            let col = self.col();
            self.pos += 1;
            let (e, t) = self.unary(depth + 1)?;
            return match t {
                ExprType::Int | ExprType::Float => Ok((Expr::Neg(Box::new(e)), t)),
                other => Err(format!("`-` at column {col} needs a number, got {}", type_name(other))),
            };
        }
        self.primary(depth)
    }

    fn primary(&mut self, depth: usize) -> Result<Typed, String> {
        let col = self.col();
        match self.bump() {
            Tok::Int(i) => Ok((Expr::Lit(Literal::Int(i)), ExprType::Int)),
            Tok::Float(f) => Ok((Expr::Lit(Literal::Float(f)), ExprType::Float)),
            Tok::Str(s) => Ok((Expr::Lit(Literal::Str(s)), ExprType::Str)),
            Tok::LParen => {
                let inner = self.or(depth + 1)?;
                self.expect(Tok::RParen, "`)`")?;
                Ok(inner)
            }
            Tok::Ident(name) => {
                let lower = name.to_ascii_lowercase();
                match lower.as_str() {
                    "true" => return Ok((Expr::Lit(Literal::Bool(true)), ExprType::Bool)),
                    "false" => return Ok((Expr::Lit(Literal::Bool(false)), ExprType::Bool)),
                    "null" => return Ok((Expr::Lit(Literal::Null), ExprType::Null)),
                    "and" | "or" | "not" | "in" | "is" => {
                        return Err(format!("expected a value at column {col}, found keyword `{name}`"))
                    }
                    _ => {}
                }
                let index = self.source.field_index(&name).ok_or_else(|| {
                    let known: Vec<&str> = self.source.fields.iter().map(|f| f.name.as_str()).collect();
                    format!(
                        "unknown field `{name}` at column {col} (source {} has {})",
                        self.source.name,
                        known.join(", ")
                    )
                })?;
                let ty = match self.source.fields[index].ty {
                    FieldType::I64 | FieldType::U64 => ExprType::Int,
                    FieldType::F64 => ExprType::Float,
                    FieldType::Bool => ExprType::Bool,
                    FieldType::String => ExprType::Str,
                };
                Ok((Expr::Field(index), ty))
            }
            other => Err(format!("expected a value at column {col}, found {}", describe(&other))),
        }
    }
}

fn type_name(t: ExprType) -> &'static str {
    match t {
        ExprType::Bool => "a boolean",
        ExprType::Int => "an integer",
        ExprType::Float => "a float",
        ExprType::Str => "a string",
        ExprType::Null => "null",
    }
}

fn numeric(t: ExprType) -> bool {
    matches!(t, ExprType::Int | ExprType::Float)
}

fn logical(op: BinOp, (l, lt): Typed, (r, rt): Typed, col: usize) -> Result<Typed, String> {
    let name = if op == BinOp::And { "and" } else { "or" };
    for t in [lt, rt] {
        if t != ExprType::Bool {
            return Err(format!("`{name}` at column {col} needs booleans on both sides, got {}", type_name(t)));
        }
    }
    Ok((Expr::Binary(op, Box::new(l), Box::new(r)), ExprType::Bool))
}

fn comparison(op: BinOp, (l, lt): Typed, (r, rt): Typed, col: usize) -> Result<Typed, String> {
    if lt == ExprType::Null || rt == ExprType::Null {
        return Err(format!("comparison with null at column {col} is never true; use `is null` or `is not null`"));
    }
    let ok = (numeric(lt) && numeric(rt))
        || (lt == ExprType::Str && rt == ExprType::Str)
        || (lt == ExprType::Bool && rt == ExprType::Bool && matches!(op, BinOp::Eq | BinOp::Ne));
    if !ok {
        return Err(format!("cannot compare {} with {} at column {col}", type_name(lt), type_name(rt)));
    }
    Ok((Expr::Binary(op, Box::new(l), Box::new(r)), ExprType::Bool))
}

fn arithmetic(op: BinOp, (l, lt): Typed, (r, rt): Typed, col: usize) -> Result<Typed, String> {
    if !numeric(lt) || !numeric(rt) {
        return Err(format!("arithmetic at column {col} needs numbers, got {} and {}", type_name(lt), type_name(rt)));
    }
    let t = if lt == ExprType::Float || rt == ExprType::Float { ExprType::Float } else { ExprType::Int };
    Ok((Expr::Binary(op, Box::new(l), Box::new(r)), t))
}

fn check_member(t: ExprType, lit: &Literal, col: usize) -> Result<(), String> {
    let ok = match lit {
        Literal::Int(_) | Literal::Float(_) => numeric(t),
        Literal::Str(_) => t == ExprType::Str,
        Literal::Bool(_) => t == ExprType::Bool,
        Literal::Null => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("the `in` list at column {col} mixes {} with a {lit:?}", type_name(t)))
    }
}

/// Parses and type-checks a filter against `source`; the result must be a boolean.
pub fn parse_filter(text: &str, source: &SourcePlan) -> Result<Expr, String> {
    if text.trim().is_empty() {
        return Err("the filter is empty".into());
    }
    let toks = lex(text)?;
    if toks.len() > MAX_DEPTH_TOKENS {
        return Err(format!("the filter has more than {MAX_DEPTH_TOKENS} tokens"));
    }
    let mut parser = Parser { toks, pos: 0, source };
    let (expr, ty) = parser.or(0)?;
    if *parser.peek() != Tok::End {
        return Err(format!("unexpected {} at column {}", describe(parser.peek()), parser.col()));
    }
    if ty != ExprType::Bool {
        return Err(format!("the filter must be a condition (a boolean), but it is {}", type_name(ty)));
    }
    Ok(expr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> SourcePlan {
        crate::source_from_json(
            r#"{"name": "tx", "time": "ts", "fields": {"user_id": "u64", "ts": "i64", "amount": "i64",
                "merchant": "string", "score": "f64", "card_present": "bool"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn parses_precedence() {
        let e = parse_filter("amount > 100 and merchant != \"test\" or not card_present", &source()).unwrap();
        let Expr::Binary(BinOp::Or, left, _) = e else { panic!("or at the top: {e:?}") };
        assert!(matches!(*left, Expr::Binary(BinOp::And, _, _)));
        let e = parse_filter("amount + 2 * 3 = 10", &source()).unwrap();
        let Expr::Binary(BinOp::Eq, left, _) = e else { panic!() };
        let Expr::Binary(BinOp::Add, _, right) = *left else { panic!() };
        assert!(matches!(*right, Expr::Binary(BinOp::Mul, _, _)));
    }

    #[test]
    fn accepts_the_whole_language() {
        for ok in [
            "merchant in ('a', \"b\")",
            "merchant NOT IN ('a')",
            "amount in (1, -2, 3.5)",
            "merchant is null or score is not null",
            "-amount < -5 and (score / 2.0) >= 1e3",
            "card_present = true",
            "amount % 7 <> 0",
            "merchant < 'm'",
        ] {
            parse_filter(ok, &source()).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn errors_name_the_cause_and_column() {
        let cases = [
            ("amout > 1", "unknown field `amout` at column 1"),
            ("amount > 'x'", "cannot compare an integer with a string at column 8"),
            ("amount > ", "expected a value at column 10"),
            ("amount + 1", "must be a condition"),
            ("merchant = null", "use `is null`"),
            ("amount > 1 and", "expected a value at column 15"),
            ("(amount > 1", "expected `)` at column 12"),
            ("amount > 1)", "unexpected `)` at column 11"),
            ("merchant in (1)", "mixes a string"),
            ("'abc", "not closed"),
            ("amount # 2", "unexpected character '#'"),
            ("card_present > false", "cannot compare a boolean"),
            ("not amount", "`not` at column 1 needs a boolean"),
            ("merchant + 1 > 2", "arithmetic at column 10 needs numbers"),
            ("", "empty"),
            ("99999999999999999999 > amount", "does not fit in 64 bits"),
        ];
        for (text, want) in cases {
            let err = parse_filter(text, &source()).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err:?} should contain {want:?}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let text = format!("{}amount > 1{}", "(".repeat(500), ")".repeat(500));
        assert!(parse_filter(&text, &source()).unwrap_err().contains("nests too deeply"));
        let text = format!("{}card_present", "not ".repeat(500));
        assert!(parse_filter(&text, &source()).unwrap_err().contains("nests too deeply"));
    }
}
