//! The computation child: one generation's timely computation in a process of its own.
//!
//! timely 0.32 is fail-fast: when a peer process dies, this process's communication threads
//! panic and its workers follow. Running the computation in a child lets the supervisor stay up,
//! report the failure and start the next generation. The child:
//! 1. reads its [`Formation`] from stdin,
//! 2. binds its data address and connects the mesh ([`crate::mesh`]),
//! 3. starts `threads` timely workers ([`crate::engine`]), and reports `Started` on stdout,
//! 4. routes requests from stdin to its worker threads: commands to worker 0 (process 0 only),
//!    an ingest batch to one thread in turn, and frontier, export and late-event requests to
//!    every thread, gathering their answers. It answers key reads itself, from the views the
//!    worker threads publish ([`ReadView`]), or hands each key to the thread that owns it when
//!    a view does not cover the read yet,
//! 5. exits when stdin closes (its supervisor is gone) or when any worker thread ends (a peer
//!    died), so it never lingers in a dead computation.

use std::io::{self, Write};
use std::net::TcpListener;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;
use timely::communication::allocator::{AllocatorBuilder, ProcessBuilder};
use timely::communication::Hooks;
use timely::WorkerConfig;

use sundial_protocol::child::{read_to_child, FromChild, ToChild};
use sundial_protocol::value::Key;
use sundial_protocol::{encode, Command, Formation, FrameError, Reply, Request};

use crate::engine::{self, Context, Gather, Job, PartJob, ReadView};
use crate::mesh;

/// Exit code of a computation whose timely workers stopped (a peer died).
pub const EXIT_WORKERS_ENDED: i32 = 3;
/// Exit code of a computation that could not start.
pub const EXIT_START_FAILED: i32 = 4;

/// How often the child reports its gauges to the supervisor.
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// How long the mesh may take to connect before the generation is given up.
pub const MESH_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes one message to the supervisor. A failure means the supervisor is gone: exit.
///
/// The message is encoded before stdout is locked: worker threads, which run at the lowest
/// priority, encode large replies (export pages), and the request thread's key-read replies
/// must not wait for that behind the lock.
pub fn tell(msg: &FromChild) {
    let frame = match encode(msg) {
        Ok(frame) => frame,
        // A reply that cannot be framed (too large) becomes an error reply.
        Err(e) => {
            tracing::error!("cannot send a reply to the supervisor: {e}");
            let FromChild::Reply { id, .. } = msg else { return };
            let reply = Reply::Error { message: format!("the reply could not be sent: {e}") };
            match encode(&FromChild::Reply { id: *id, reply }) {
                Ok(frame) => frame,
                Err(_) => std::process::exit(0),
            }
        }
    };
    let mut out = io::stdout().lock();
    if out.write_all(&frame).and_then(|()| out.flush()).is_err() {
        // The supervisor is gone.
        std::process::exit(0);
    }
}

/// Runs the child until its supervisor goes away or the computation dies. `listen` is the local
/// address to bind for timely data traffic.
pub fn run(listen: &str, data_dir: std::path::PathBuf, fsync: crate::log::Fsync) -> ! {
    let mut stdin = io::stdin().lock();
    let formation = match read_to_child(&mut stdin) {
        Ok(ToChild::Form(f)) => f,
        Ok(other) => fail(&format!("expected a formation first, got {other:?}")),
        Err(FrameError::Closed) => std::process::exit(0),
        Err(e) => fail(&format!("reading the formation: {e}")),
    };
    let generation = formation.generation;
    let listener = match TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => {
            let reason = format!("cannot bind data address {listen}: {e}");
            tracing::error!("{reason}");
            tell(&FromChild::BindFailed { reason });
            std::process::exit(EXIT_START_FAILED)
        }
    };
    let sockets = match mesh::connect(&formation, listener, MESH_TIMEOUT) {
        Ok(s) => s,
        Err(e) => fail(&format!("generation {generation}: {e}")),
    };

    let threads = formation.threads;
    // The checkpoint to start from: its batch ids are remembered again right away.
    let batches = Mutex::new(engine::Batches::default());
    let restore = match formation.restore {
        Some(epoch) => match crate::checkpoint::read_complete(&data_dir, epoch) {
            Ok(part) if part.threads == threads => {
                if let Ok(mut b) = batches.lock() {
                    for (id, outcome) in &part.batches {
                        b.done(id, outcome.clone());
                    }
                }
                tracing::info!(generation, epoch, dataflows = part.dataflows.len(), "restoring the checkpoint");
                Some(part)
            }
            Ok(part) => fail(&format!(
                "the checkpoint at epoch {epoch} was written by {} threads per process; this worker runs {threads}",
                part.threads
            )),
            Err(e) => {
                let aside = crate::checkpoint::set_aside(&data_dir, epoch).map_or_else(
                    |e| format!("it could not be set aside: {e}"),
                    |p| format!("it was set aside as {}", p.display()),
                );
                fail(&format!(
                    "generation {generation}: cannot restore the checkpoint at epoch {epoch}: {e}; {aside}, and the next generation falls back to an older checkpoint"
                ))
            }
        },
        None => None,
    };
    let mut senders = Vec::with_capacity(threads);
    let mut receivers = Vec::with_capacity(threads);
    for _ in 0..threads {
        let (tx, rx) = mpsc::channel::<Job>();
        senders.push(tx);
        receivers.push(Some(rx));
    }
    let ctx = Arc::new(Context {
        generation,
        processes: formation.addresses.len(),
        jobs: Mutex::new(receivers),
        threads: (0..threads).map(|_| OnceLock::new()).collect(),
        gauges: Mutex::new(vec![engine::ThreadGauges::default(); threads]),
        data_dir,
        fsync,
        batches,
        recovered: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        restore,
        checkpoints: Mutex::new(std::collections::HashMap::new()),
        schemas: std::sync::RwLock::new(std::collections::HashMap::new()),
        views: Mutex::new(std::collections::HashMap::new()),
        acked: std::sync::atomic::AtomicU64::new(0),
    });
    // timely's worker and communication threads are started from a background thread, whose
    // scheduling they inherit (`sundial_dataflows::priority`): they run ingest, while this thread
    // goes on to answer reads. (A thread that lowered its own priority could not raise it again
    // without privileges.)
    let started = thread::scope(|scope| {
        let starter = thread::Builder::new().name("sundial:start".into()).spawn_scoped(scope, || {
            sundial_dataflows::priority::run_in_background();
            start_timely(&formation, sockets, Arc::clone(&ctx))
        });
        match starter {
            Ok(handle) => handle.join().unwrap_or_else(|_| Err("the thread starting timely panicked".into())),
            Err(e) => Err(format!("spawning the thread that starts timely: {e}")),
        }
    });
    let guards = match started {
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
                tracing::error!(generation, "a timely worker stopped (a peer process died?); ending this computation");
                let _ = io::stderr().flush();
                std::process::exit(EXIT_WORKERS_ENDED);
            }
            thread::sleep(Duration::from_millis(20));
        })
        .unwrap_or_else(|e| fail(&format!("spawning the watch thread: {e}")));

    // Report each dataflow's newest epoch complete on every local thread when it changes.
    let reporter_ctx = Arc::clone(&ctx);
    thread::Builder::new()
        .name("sundial:frontiers".into())
        .spawn(move || {
            let mut last: Vec<(String, u64)> = Vec::new();
            loop {
                thread::sleep(Duration::from_millis(10));
                let mut now: Vec<(String, u64)> = match reporter_ctx.views.lock() {
                    Ok(views) => views
                        .iter()
                        .filter_map(|(name, threads)| {
                            let all: Option<Vec<u64>> =
                                threads.iter().map(|v| v.as_ref().map(|v| v.complete())).collect();
                            all.and_then(|v| v.into_iter().min()).map(|m| (name.clone(), m))
                        })
                        .collect(),
                    Err(_) => continue,
                };
                now.sort();
                if now != last {
                    tell(&FromChild::Frontiers { frontiers: now.clone() });
                    last = now;
                }
            }
        })
        .unwrap_or_else(|e| fail(&format!("spawning the frontier reporter: {e}")));

    // Report what the threads hold every second.
    let stats_ctx = Arc::clone(&ctx);
    thread::Builder::new()
        .name("sundial:stats".into())
        .spawn(move || loop {
            thread::sleep(STATS_INTERVAL);
            let (sources, dataflows) = stats_ctx.process_gauges();
            tell(&FromChild::Stats { sources, dataflows });
        })
        .unwrap_or_else(|e| fail(&format!("spawning the stats reporter: {e}")));

    // One parser per worker thread, fed in order: a batch reaches its worker thread after every
    // batch routed to that thread before it, parsed off the worker thread (which also answers
    // reads) when the source's schema is known in this process.
    let parsers: Vec<Sender<Job>> = senders
        .iter()
        .enumerate()
        .map(|(local, to_worker)| {
            let (tx, rx) = mpsc::channel::<Job>();
            let (to_worker, ctx) = (to_worker.clone(), Arc::clone(&ctx));
            thread::Builder::new()
                .name(format!("sundial:parse-{local}"))
                .spawn(move || {
                    sundial_dataflows::priority::run_in_background();
                    for job in rx {
                        let job = parse_ingest(job, &ctx);
                        if !deliver(&to_worker, &ctx, local, job) {
                            return;
                        }
                    }
                })
                .unwrap_or_else(|e| fail(&format!("spawning an ingest parser: {e}")));
            tx
        })
        .collect();
    let router = Router {
        senders,
        parsers,
        ctx,
        process: formation.index,
        threads,
        peers: threads * formation.addresses.len(),
        next: 0,
    };
    serve_stdin(stdin, router)
}

/// Hands `job` to worker thread `local` and wakes it; false if the thread has stopped.
fn deliver(to_worker: &Sender<Job>, ctx: &Context, local: usize, job: Job) -> bool {
    let sent = to_worker.send(job).is_ok();
    if let Some(t) = ctx.threads.get(local).and_then(|t| t.get()) {
        t.unpark();
    }
    sent
}

/// An ingest job with its body parsed, when its source's schema is known here (the worker thread
/// checks that the schema is still the source's, and parses the body itself otherwise).
fn parse_ingest(job: Job, ctx: &Context) -> Job {
    let Job::Ingest { id, after, source, csv, body, first_line, min_epoch, batch, parsed: None } = job else {
        return job;
    };
    let schema = ctx.schemas.read().ok().and_then(|s| s.get(&source).cloned());
    let parsed = schema.map(|plan| {
        let (rows, errors) = sundial_dataflows::row::parse_body(&body, csv, &plan, first_line);
        engine::Parsed { plan, rows, errors }
    });
    Job::Ingest { id, after, source, csv, body, first_line, min_epoch, batch, parsed }
}

/// Reports that the computation cannot go on, and exits.
pub fn fail(reason: &str) -> ! {
    tracing::error!("{reason}");
    tell(&FromChild::Failed { reason: reason.to_string() });
    std::process::exit(EXIT_START_FAILED)
}

/// Routes requests from the supervisor to the worker threads of this process.
struct Router {
    senders: Vec<Sender<Job>>,
    /// Each worker thread's ingest parser.
    parsers: Vec<Sender<Job>>,
    ctx: Arc<Context>,
    process: usize,
    threads: usize,
    peers: usize,
    next: usize,
}

impl Router {
    fn send(&self, local: usize, job: Job) -> bool {
        self.senders.get(local).is_some_and(|to_worker| deliver(to_worker, &self.ctx, local, job))
    }

    fn route(&mut self, id: u64, request: Request) -> Result<(), String> {
        let gather_all = |part: &dyn Fn() -> PartJob, after: u64, router: &Router| {
            let gather = Gather::new(id, router.threads);
            for local in 0..router.threads {
                router.send(local, Job::Part { after, part: part(), gather: Arc::clone(&gather) });
            }
        };
        match request {
            Request::Check { records_per_pair } if self.process == 0 => {
                self.send(0, Job::Sequence { id, command: Command::Check { id, records_per_pair } });
            }
            Request::Command(command) if self.process == 0 => {
                self.send(0, Job::Sequence { id, command });
            }
            Request::Check { .. } | Request::Command(_) => {
                return Err("commands are sequenced by process 0".into());
            }
            Request::Ingest { after, source, csv, body, first_line, min_epoch, batch } => {
                // Each batch goes to one worker thread (its ingest partition), in turn, through
                // that thread's parser.
                let local = self.next % self.threads;
                self.next += 1;
                let job = Job::Ingest { id, after, source, csv, body, first_line, min_epoch, batch, parsed: None };
                if self.parsers.get(local).is_none_or(|p| p.send(job).is_err()) {
                    return Err("the ingest parser of this worker thread has stopped".into());
                }
            }
            Request::Frontier { after, dataflow } => {
                gather_all(&|| PartJob::Frontier { dataflow: dataflow.clone() }, after, self);
            }
            Request::Recovered { after } => {
                gather_all(&|| PartJob::Recovered, after, self);
            }
            Request::Acked => {
                let epoch = self.ctx.acked.load(std::sync::atomic::Ordering::SeqCst);
                tell(&FromChild::Reply { id, reply: Reply::Acked { epoch } });
            }
            Request::Late { after, source } => {
                gather_all(&|| PartJob::Late { source: source.clone() }, after, self);
            }
            Request::Read { after, dataflow, as_of, keys, timeout_ms, page } => {
                let deadline = std::time::Instant::now() + Duration::from_millis(timeout_ms);
                // Every process hears of every read whose epoch may not be complete yet (the
                // coordinator tells those that own none of its keys too): each of its partitions
                // moves past the read's epoch at once, so that a read at an ingest reply's epoch
                // does not wait for the other partitions' next tick. An epoch one local thread
                // reports complete is complete everywhere: then nobody needs waking.
                let complete = self.ctx.views.lock().ok().is_some_and(|views| {
                    views.get(&dataflow).is_some_and(|threads| threads.iter().flatten().any(|v| v.complete() >= as_of))
                });
                if !complete {
                    for local in 0..self.threads {
                        self.send(local, Job::Advance { past: as_of });
                    }
                }
                match keys {
                    None => {
                        let gather = match &page {
                            Some(p) => Gather::page(id, self.threads, p.limit as usize),
                            None => Gather::new(id, self.threads),
                        };
                        for local in 0..self.threads {
                            let part = PartJob::Read {
                                dataflow: dataflow.clone(),
                                as_of,
                                keys: None,
                                deadline,
                                page: page.clone(),
                            };
                            self.send(local, Job::Part { after, part, gather: Arc::clone(&gather) });
                        }
                    }
                    Some(keys) => {
                        // Each key goes to the worker thread that owns it.
                        let mut by_local: Vec<Vec<Key>> = vec![Vec::new(); self.threads];
                        for key in keys {
                            let owner = (key.hash64() % self.peers as u64) as usize;
                            let local = owner.checked_sub(self.process * self.threads).filter(|l| *l < self.threads);
                            match local {
                                Some(l) => by_local[l].push(key),
                                None => {
                                    return Err(format!("key {key:?} belongs to worker {owner}, not to this process"))
                                }
                            }
                        }
                        let parts: Vec<(usize, Vec<Key>)> =
                            by_local.into_iter().enumerate().filter(|(_, k)| !k.is_empty()).collect();
                        if parts.is_empty() {
                            tell(&FromChild::Reply {
                                id,
                                reply: Reply::Read { watermark: None, results: Vec::new(), more: false },
                            });
                            return Ok(());
                        }
                        // Answered here when every part's worker thread has a view that covers
                        // it (the usual case), otherwise by the worker threads.
                        let parts = match self.read_here(id, &dataflow, after, as_of, parts) {
                            Ok(()) => return Ok(()),
                            Err(parts) => parts,
                        };
                        let gather = Gather::new(id, parts.len());
                        for (local, keys) in parts {
                            let part = PartJob::Read {
                                dataflow: dataflow.clone(),
                                as_of,
                                keys: Some(keys),
                                deadline,
                                page: None,
                            };
                            self.send(local, Job::Part { after, part, gather: Arc::clone(&gather) });
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Router {
    /// Answers a key read from the worker threads' [`ReadView`]s when each of `parts` (keys by
    /// local thread) has one that covers `as_of` after the first `after` commands; gives the
    /// parts back otherwise.
    fn read_here(
        &self,
        id: u64,
        dataflow: &str,
        after: u64,
        as_of: u64,
        parts: Vec<(usize, Vec<Key>)>,
    ) -> Result<(), Vec<(usize, Vec<Key>)>> {
        let views: Option<Vec<Arc<ReadView>>> = self.ctx.views.lock().ok().and_then(|all| {
            let threads = all.get(dataflow)?;
            parts.iter().map(|(local, _)| threads.get(*local)?.clone()).collect()
        });
        let Some(views) = views else { return Err(parts) };
        if !views.iter().all(|view| view.covers(after, as_of)) {
            views.into_iter().for_each(ReadView::let_go);
            return Err(parts);
        }
        let mut results = Vec::new();
        let outcome = views.iter().zip(parts).try_for_each(|(view, (_, keys))| view.read(keys, as_of, &mut results));
        // Every thread computes the same watermarks; the views cover `as_of`, so it is not
        // compacted away (an error here would be a bug, answered as an error).
        let reply = match outcome {
            Ok(()) => Reply::Read { watermark: views.first().and_then(|v| v.watermark(as_of)), results, more: false },
            Err(e) => Reply::Error { message: e.to_string() },
        };
        tell(&FromChild::Reply { id, reply });
        // After the reply: letting go of a view may hand its batches to a merge thread.
        views.into_iter().for_each(ReadView::let_go);
        Ok(())
    }
}

fn serve_stdin(mut stdin: io::StdinLock<'_>, mut router: Router) -> ! {
    loop {
        match read_to_child(&mut stdin) {
            Ok(ToChild::Request { id, request, .. }) => {
                if let Err(message) = router.route(id, request) {
                    tell(&FromChild::Reply { id, reply: Reply::Error { message } });
                }
            }
            Ok(ToChild::Form(_)) => tracing::warn!("ignored a second formation; a child runs one generation"),
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
    ctx: Arc<Context>,
) -> Result<timely::communication::WorkerGuards<()>, String> {
    let threads = formation.threads;
    let hooks = Hooks::default();
    let process = ProcessBuilder::new_typed_vector(threads, hooks.refill.clone(), hooks.spill.clone());
    let (builders, comms) = initialize_networking_from_sockets(process, sockets, formation.index, threads, hooks)
        .map_err(|e| e.to_string())?;
    let builders = builders.into_iter().map(AllocatorBuilder::Tcp).collect();
    timely::execute::execute_from(builders, Box::new(comms), WorkerConfig::default(), move |worker| {
        engine::run(worker, Arc::clone(&ctx))
    })
}
