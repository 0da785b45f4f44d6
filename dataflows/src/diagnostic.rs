//! The exchange check: evidence that all processes form one timely computation.
//!
//! For a [`Command::Check`], every worker thread sends `records_per_pair` records to every worker
//! thread (routed by an exchange on the destination), each receiver tags what it got with its own
//! index, and everything is exchanged to worker 0, which counts `received[to][from]`. Only a
//! computation whose every pair of threads can exchange data produces a full matrix.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Exchange, Probe};
use timely::dataflow::{ProbeHandle, StreamVec};

use sundial_protocol::Command;

use crate::control::Seq;

/// Counts gathered on worker 0: request id -> `received[to][from]`.
pub type CheckCounts = Rc<RefCell<HashMap<u64, Vec<Vec<u64>>>>>;

/// Renders the exchange check on the broadcast command stream. `index` and `peers` are the
/// worker's timely index and the number of worker threads in the computation. The returned map
/// is only ever filled on worker 0; an entry is complete once `probe`, attached here to the
/// stream that feeds the counts, has passed the time of its command.
pub fn exchange_check(
    commands: StreamVec<'_, Seq, Command>,
    index: usize,
    peers: usize,
    probe: &ProbeHandle<Seq>,
) -> CheckCounts {
    let counts: CheckCounts = Rc::new(RefCell::new(HashMap::new()));
    let sink = Rc::clone(&counts);
    let me = index as u64;
    commands
        .flat_map(move |cmd| {
            let (id, records_per_pair) = match cmd {
                Command::Check { id, records_per_pair } => (id, records_per_pair),
                _ => (0, 0),
            };
            (0..peers as u64).flat_map(move |to| (0..records_per_pair).map(move |_| (id, me, to)))
        })
        .exchange(|&(_, _, to)| to)
        .map(move |(id, from, _to)| (id, from, me))
        .exchange(|_| 0)
        .unary::<CapacityContainerBuilder<Vec<()>>, _, _, _>(Pipeline, "ExchangeCheckCount", move |_, _| {
            move |input, _output| {
                let mut counts = sink.borrow_mut();
                input.for_each(|_cap, data| {
                    for (id, from, to) in data.drain(..) {
                        let matrix = counts.entry(id).or_insert_with(|| vec![vec![0; peers]; peers]);
                        if let Some(cell) = matrix.get_mut(to as usize).and_then(|row| row.get_mut(from as usize)) {
                            *cell += 1;
                        }
                    }
                });
            }
        })
        // The probe follows the counting operator: passing a time means everything was counted.
        .probe_with(probe);
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{control_probe, control_stream};

    /// Four worker threads in one process: worker 0 sees the full 4x4 matrix.
    #[test]
    fn every_thread_hears_from_every_thread() {
        let guards = timely::execute(timely::Config::process(4), |worker| {
            let index = worker.index();
            let peers = worker.peers();
            let probe = control_probe();
            let (mut input, counts) = worker.dataflow::<Seq, _, _>(|scope| {
                let (input, commands) = control_stream(scope);
                (input, exchange_check(commands, index, peers, &probe))
            });
            if index == 0 {
                input.send(Command::Check { id: 9, records_per_pair: 5 });
            }
            input.advance_to(1);
            worker.step_while(|| probe.less_equal(&0));
            let result = counts.borrow_mut().remove(&9);
            result
        })
        .expect("timely starts");
        let results: Vec<_> = guards.join().into_iter().map(|r| r.expect("worker ok")).collect();
        assert_eq!(results[0], Some(vec![vec![5; 4]; 4]));
        assert!(results[1..].iter().all(Option::is_none));
    }
}
