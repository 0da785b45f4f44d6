//! The control dataflow: one ordered stream of [`Command`]s, seen by every worker.
//!
//! Timely requires that every worker builds the same dataflows in the same order, so commands
//! that change the graph cannot be delivered to workers directly: two workers could see them in
//! different orders. Instead worker 0 is the only one that sends into the control input; it
//! stamps the n-th command with time n and the stream is broadcast. A worker applies the
//! commands of time t once its probe has passed t, in time order, so all agree.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::vec::Broadcast;

use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::{Input, Probe};
use timely::dataflow::{InputHandle, ProbeHandle, Scope, StreamVec};

use sundial_protocol::Command;

/// The time of the control dataflow: the sequence number of a command.
pub type Seq = u64;

/// Builds the control input. Returns the input handle (only worker 0 should send into it; the
/// others should close theirs) and the broadcast command stream. Consumers of the stream attach
/// the control probe at their ends, so that the probe passing time t means every consequence of
/// command t is complete.
pub fn control_stream<'s>(scope: Scope<'s, Seq>) -> (ControlInput, StreamVec<'s, Seq, Command>) {
    let (input, commands) = scope.new_input::<Vec<Command>>();
    (input, commands.broadcast())
}

/// Commands received by this worker, by sequence number, not yet applied.
pub type CommandLog = Rc<RefCell<BTreeMap<Seq, Vec<Command>>>>;

/// Collects the broadcast commands into a log this worker applies once `probe` has passed their
/// time (the probe follows the collecting operator, so nothing is still in flight).
pub fn collect_commands(commands: StreamVec<'_, Seq, Command>, probe: &ProbeHandle<Seq>) -> CommandLog {
    let log: CommandLog = Rc::new(RefCell::new(BTreeMap::new()));
    let sink = Rc::clone(&log);
    commands
        .unary::<CapacityContainerBuilder<Vec<()>>, _, _, _>(Pipeline, "CollectCommands", move |_, _| {
            move |input, _output| {
                input.for_each(|cap, data| {
                    if let Some(&t) = cap.least() {
                        sink.borrow_mut().entry(t).or_default().append(data);
                    }
                });
            }
        })
        .probe_with(probe);
    log
}

/// A new probe for the control dataflow.
pub fn control_probe() -> ProbeHandle<Seq> {
    ProbeHandle::new()
}

/// The input handle of the control dataflow.
pub type ControlInput = InputHandle<Seq, CapacityContainerBuilder<Vec<Command>>>;
