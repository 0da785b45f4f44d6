//! The control dataflow: one ordered stream of [`Command`]s, seen by every worker.
//!
//! Timely requires that every worker builds the same dataflows in the same order, so commands
//! that change the graph cannot be delivered to workers directly: two workers could see them in
//! different orders. Instead worker 0 is the only one that sends into the control input; it
//! stamps the n-th command with time n and the stream is broadcast. A worker applies the
//! commands of time t once its probe has passed t, in time order, so all agree.

use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::Input;
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

/// A new probe for the control dataflow.
pub fn control_probe() -> ProbeHandle<Seq> {
    ProbeHandle::new()
}

/// The input handle of the control dataflow.
pub type ControlInput = InputHandle<Seq, CapacityContainerBuilder<Vec<Command>>>;
