//! The computation child: one generation's timely computation in a process of its own.
//!
//! timely 0.32 is fail-fast: when a peer process dies, this process's communication threads
//! panic and its workers follow. Running the computation in a child lets the supervisor stay up,
//! report the failure and start the next generation. The child:
//! 1. reads its [`Formation`] from stdin,
//! 2. binds its data address and connects the mesh ([`crate::mesh`]),
//! 3. starts `threads` timely workers, which build the control dataflow and the diagnostic
//!    dataflow, and reports `Started` on stdout,
//! 4. forwards requests from stdin to timely worker 0 (only process 0 gets any),
//! 5. exits when stdin closes (its supervisor is gone) or when any worker thread ends (a peer
//!    died), so it never lingers in a dead computation.

use std::io::{self, Write};
use std::net::TcpListener;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, Thread};
use std::time::Duration;

use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;
use timely::communication::allocator::{AllocatorBuilder, ProcessBuilder};
use timely::communication::Hooks;
use timely::WorkerConfig;

use sundial_dataflows::control::{control_probe, control_stream, Seq};
use sundial_dataflows::diagnostic::exchange_check;
use sundial_protocol::child::{FromChild, ToChild};
use sundial_protocol::{
    read_msg, write_msg, CheckReport, Command, Formation, FrameError, Reply, Request,
};

use crate::mesh;

/// Exit code of a computation whose timely workers stopped (a peer died).
pub const EXIT_WORKERS_ENDED: i32 = 3;
/// Exit code of a computation that could not start.
pub const EXIT_START_FAILED: i32 = 4;

/// How long the mesh may take to connect before the generation is given up.
pub const MESH_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes one message to the supervisor. A failure means the supervisor is gone: exit.
fn tell(msg: &FromChild) {
    let mut out = io::stdout().lock();
    if write_msg(&mut out, msg).is_err() {
        std::process::exit(0);
    }
}

/// Runs the child until its supervisor goes away or the computation dies. `listen` is the local
/// address to bind for timely data traffic.
pub fn run(listen: &str) -> ! {
    let mut stdin = io::stdin().lock();
    let formation = match read_msg::<_, ToChild>(&mut stdin) {
        Ok(ToChild::Form(f)) => f,
        Ok(other) => fail(&format!("expected a formation first, got {other:?}")),
        Err(FrameError::Closed) => std::process::exit(0),
        Err(e) => fail(&format!("reading the formation: {e}")),
    };
    let generation = formation.generation;
    let listener = match TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => fail(&format!("cannot bind data address {listen}: {e}")),
    };
    let sockets = match mesh::connect(&formation, listener, MESH_TIMEOUT) {
        Ok(s) => s,
        Err(e) => fail(&format!("generation {generation}: {e}")),
    };

    let (request_tx, request_rx) = mpsc::channel::<(u64, Request)>();
    let worker0 = Arc::new(Worker0 {
        requests: Mutex::new(Some(request_rx)),
        thread: OnceLock::new(),
    });
    let guards = match start_timely(&formation, sockets, Arc::clone(&worker0)) {
        Ok(g) => g,
        Err(e) => fail(&format!("generation {generation}: starting timely: {e}")),
    };
    tracing::info!(generation, index = formation.index, "computation started");
    tell(&FromChild::Started);

    // A worker thread ends only by panicking (a peer died, or a bug); end the process with it.
    thread::Builder::new()
        .name("sundial:watch".into())
        .spawn(move || loop {
            if guards.guards().iter().any(|g| g.is_finished()) {
                tracing::error!(
                    generation,
                    "a timely worker stopped (a peer process died?); ending this computation"
                );
                let _ = io::stderr().flush();
                std::process::exit(EXIT_WORKERS_ENDED);
            }
            thread::sleep(Duration::from_millis(20));
        })
        .unwrap_or_else(|e| fail(&format!("spawning the watch thread: {e}")));

    serve_stdin(stdin, &request_tx, &worker0)
}

fn fail(reason: &str) -> ! {
    tracing::error!("{reason}");
    tell(&FromChild::Failed {
        reason: reason.to_string(),
    });
    std::process::exit(EXIT_START_FAILED)
}

/// What the stdin thread shares with timely worker 0.
struct Worker0 {
    requests: Mutex<Option<Receiver<(u64, Request)>>>,
    thread: OnceLock<Thread>,
}

fn serve_stdin(
    mut stdin: io::StdinLock<'_>,
    requests: &Sender<(u64, Request)>,
    worker0: &Worker0,
) -> ! {
    loop {
        match read_msg::<_, ToChild>(&mut stdin) {
            Ok(ToChild::Request { id, request }) => {
                if requests.send((id, request)).is_err() {
                    tell(&FromChild::Reply {
                        id,
                        reply: Reply::Error {
                            message: "this process runs no timely worker 0".into(),
                        },
                    });
                }
                if let Some(t) = worker0.thread.get() {
                    t.unpark();
                }
            }
            Ok(ToChild::Form(_)) => {
                tracing::warn!("ignored a second formation; a child runs one generation")
            }
            Err(FrameError::Closed) => std::process::exit(0),
            Err(e) => {
                tracing::error!(error = %e, "the supervisor pipe broke; exiting");
                std::process::exit(0)
            }
        }
    }
}

fn start_timely(
    formation: &Formation,
    sockets: Vec<Option<std::net::TcpStream>>,
    worker0: Arc<Worker0>,
) -> Result<timely::communication::WorkerGuards<()>, String> {
    let threads = formation.threads;
    let hooks = Hooks::default();
    let process =
        ProcessBuilder::new_typed_vector(threads, hooks.refill.clone(), hooks.spill.clone());
    let (builders, comms) =
        initialize_networking_from_sockets(process, sockets, formation.index, threads, hooks)
            .map_err(|e| e.to_string())?;
    let builders = builders.into_iter().map(AllocatorBuilder::Tcp).collect();
    let generation = formation.generation;
    let processes = formation.addresses.len();
    timely::execute::execute_from(
        builders,
        Box::new(comms),
        WorkerConfig::default(),
        move |worker| {
            let index = worker.index();
            let peers = worker.peers();
            let probe = control_probe();
            let (mut input, counts) = worker.dataflow::<Seq, _, _>(|scope| {
                let (input, commands) = control_stream(scope);
                (input, exchange_check(commands, index, peers, &probe))
            });
            let requests = if index == 0 {
                worker0.requests.lock().ok().and_then(|mut r| r.take())
            } else {
                None
            };
            let Some(requests) = requests else {
                // Only worker 0 sends commands; the others follow the broadcast stream.
                input.close();
                loop {
                    worker.step_or_park(None);
                }
            };
            let _ = worker0.thread.set(thread::current());
            // Checks injected and not yet complete: (time, request id, records per pair).
            let mut pending: Vec<(Seq, u64, u32)> = Vec::new();
            loop {
                while let Ok((id, request)) = requests.try_recv() {
                    let time = *input.time();
                    match request {
                        Request::Check { records_per_pair } => {
                            input.send(Command::Check {
                                id,
                                records_per_pair,
                            });
                            pending.push((time, id, records_per_pair));
                        }
                    }
                    input.advance_to(time + 1);
                }
                worker.step_or_park(Some(Duration::from_millis(100)));
                pending.retain(|&(time, id, records_per_pair)| {
                    if probe.less_equal(&time) {
                        return true;
                    }
                    let received = counts
                        .borrow_mut()
                        .remove(&id)
                        .unwrap_or_else(|| vec![vec![0; peers]; peers]);
                    tell(&FromChild::Reply {
                        id,
                        reply: Reply::Check(CheckReport {
                            generation,
                            processes,
                            threads: peers / processes.max(1),
                            records_per_pair,
                            received,
                        }),
                    });
                    false
                });
            }
        },
    )
}
