//! The soak's clients: short TCP connections and UDP request/replies in
//! paced loops, and long-lived idle connections checked now and then. Every
//! attempt is recorded with when it started and ended, so the report can
//! tell a failure inside the flood or a restart from one outside.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use testbed::{Netns, tcp_ask, udp_ask};

use super::bed::{PUSH_EVERY, Targets};

/// A kind of traffic, as the report names it.
pub type Kind = &'static str;

/// One failed attempt: between `from` and `to` (seconds since the start)
/// something broke. For a short connection, its own life; for an idle one,
/// the time since its last good check.
#[derive(Clone, Debug)]
pub struct Failure {
    pub kind: Kind,
    pub from: f64,
    pub to: f64,
    pub error: String,
}

/// What every client thread reports to.
pub struct Recorder {
    start: Instant,
    tallies: Mutex<Tallies>,
}

#[derive(Default)]
struct Tallies {
    attempts: BTreeMap<Kind, u64>,
    failures: Vec<Failure>,
}

impl Recorder {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            tallies: Mutex::new(Tallies::default()),
        }
    }

    /// Seconds since the soak started.
    pub fn secs(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.start).as_secs_f64()
    }

    /// Records one attempt of `kind` that ran from `from` to now.
    pub fn record(&self, kind: Kind, from: Instant, outcome: Result<()>) {
        let to = Instant::now();
        let mut t = self.tallies.lock().unwrap();
        *t.attempts.entry(kind).or_default() += 1;
        if let Err(e) = outcome {
            t.failures.push(Failure {
                kind,
                from: self.secs(from),
                to: self.secs(to),
                error: format!("{e:#}"),
            });
        }
    }

    /// Attempts by kind, and every failure.
    pub fn snapshot(&self) -> (BTreeMap<Kind, u64>, Vec<Failure>) {
        let t = self.tallies.lock().unwrap();
        (t.attempts.clone(), t.failures.clone())
    }
}

/// How long a connect, a reply or a check may take before it counts as
/// failed (a SYN or two may be retransmitted in that time: fine).
const TIMEOUT: Duration = Duration::from_secs(5);

/// The reply of one of the backends' servers: "b{i} {peer}".
fn check_reply(reply: &str) -> Result<()> {
    ensure!(
        reply.starts_with('b') && reply.ends_with('\n'),
        "odd reply {reply:?}"
    );
    Ok(())
}

/// Starts the paced loops, each on a thread of its own inside `client`:
/// one short TCP connection or UDP exchange per `period` per kind, until
/// `stop`. Returns the threads.
pub fn start_short(
    client: &Netns,
    targets: &Targets,
    period: Duration,
    recorder: &Arc<Recorder>,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<thread::JoinHandle<()>>> {
    let tcp = [
        ("tcp-churn", targets.churn),
        ("tcp-steady", targets.steady),
        ("tcp-snat", targets.snat),
        ("tcp-dns", targets.dns),
        ("tcp-v6", targets.v6),
    ];
    let mut threads = Vec::new();
    for (kind, target) in tcp {
        let (recorder, stop) = (recorder.clone(), stop.clone());
        threads.push(client.spawn(move || {
            paced(period, &stop, || {
                let from = Instant::now();
                let outcome = tcp_ask(target, TIMEOUT).and_then(|r| check_reply(&r));
                recorder.record(kind, from, outcome);
            })
        })?);
    }
    let (recorder, stop, udp) = (recorder.clone(), stop.clone(), targets.udp);
    threads.push(client.spawn(move || {
        paced(period, &stop, || {
            let from = Instant::now();
            // A new socket (a new flow) each time; up to 3 sends, each
            // waiting a third of the timeout.
            let outcome = udp_ask(udp, 0, TIMEOUT / 3).and_then(|r| check_reply(&r));
            recorder.record("udp", from, outcome);
        })
    })?);
    Ok(threads)
}

/// Runs `f` every `period` (not more often; later if `f` takes longer)
/// until `stop`.
fn paced(period: Duration, stop: &AtomicBool, mut f: impl FnMut()) {
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        f();
        next += period;
        let now = Instant::now();
        if next > now {
            sleep_unless(stop, next - now);
        } else {
            next = now;
        }
    }
}

/// Sleeps for `d`, waking early if `stop` is set.
pub fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= until {
            return;
        }
        thread::sleep((until - now).min(Duration::from_millis(100)));
    }
}

/// A long-lived connection and how to tell it still works.
enum Conn {
    /// Client-first: answers a line with the same line.
    Echo(BufReader<TcpStream>),
    /// Server-first: keeps receiving the server's pushes.
    Push(BufReader<TcpStream>),
}

impl Conn {
    fn open(target: SocketAddr, push: bool) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&target, TIMEOUT)
            .with_context(|| format!("connecting to {target}"))?;
        // A push comes every PUSH_EVERY: wait for one a little longer.
        stream.set_read_timeout(Some(TIMEOUT.max(PUSH_EVERY * 2)))?;
        let mut r = BufReader::new(stream);
        let mut line = String::new();
        if push {
            r.read_line(&mut line)?;
            ensure!(line == "push\n", "first push {line:?}");
            return Ok(Conn::Push(r));
        }
        // The servers' protocol: "echo", their name, then echoes.
        r.get_mut().write_all(b"echo\n")?;
        r.read_line(&mut line)?;
        ensure!(line.starts_with('b'), "greeting {line:?} from {target}");
        Ok(Conn::Echo(r))
    }

    fn still_works(&mut self, n: u64) -> Result<()> {
        let mut line = String::new();
        match self {
            Conn::Echo(r) => {
                let ask = format!("still there {n}?\n");
                r.get_mut().write_all(ask.as_bytes())?;
                r.read_line(&mut line)?;
                ensure!(line == ask, "echoed {line:?}, not {ask:?}");
            }
            Conn::Push(r) => {
                // What came since the last check is drained (each a whole
                // push); then a push must come from after the check began:
                // the server still reaches the client now.
                let mut old = std::mem::take(&mut line);
                let buffered = r.buffer().len();
                old.push_str(&String::from_utf8_lossy(r.buffer()));
                r.consume(buffered);
                let stream = r.get_mut();
                stream.set_nonblocking(true)?;
                let mut chunk = [0u8; 4096];
                let drained = loop {
                    match stream.read(&mut chunk) {
                        Ok(0) => break Err(anyhow::anyhow!("the server closed the connection")),
                        Ok(n) => old.push_str(&String::from_utf8_lossy(&chunk[..n])),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(()),
                        Err(e) => break Err(e.into()),
                    }
                };
                stream.set_nonblocking(false)?;
                drained?;
                ensure!(
                    old.split_inclusive('\n').all(|l| l == "push\n"),
                    "pushed {old:?}"
                );
                r.read_line(&mut line)?;
                ensure!(line == "push\n", "pushed {line:?}");
            }
        }
        Ok(())
    }
}

/// One idle connection: its kind, target, and when it last worked.
struct Idle {
    kind: Kind,
    target: SocketAddr,
    push: bool,
    conn: Option<Conn>,
    last_ok: Instant,
}

/// Opens `each` long-lived connections of every idle kind (client-first
/// through `steady` and `steady-snat`, server-first through `push`) on a
/// thread inside `client`, and checks each every `every` until `stop`. A
/// broken one is recorded (from its last good check to now) and opened
/// again.
pub fn start_idle(
    client: &Netns,
    targets: &Targets,
    each: usize,
    every: Duration,
    recorder: &Arc<Recorder>,
    stop: &Arc<AtomicBool>,
) -> Result<thread::JoinHandle<()>> {
    let kinds = [
        ("idle-echo", targets.steady, false),
        ("idle-snat", targets.snat, false),
        ("idle-push", targets.push, true),
    ];
    // Opened here, before the soak's clock runs on: a connection that can't
    // be opened at all is a broken bed, not a soak result.
    let opened = client.enter(|| -> Result<Vec<Idle>> {
        let mut all = Vec::new();
        for (kind, target, push) in kinds {
            for _ in 0..each {
                let conn = Conn::open(target, push)
                    .with_context(|| format!("opening an {kind} connection"))?;
                all.push(Idle {
                    kind,
                    target,
                    push,
                    conn: Some(conn),
                    last_ok: Instant::now(),
                });
            }
        }
        Ok(all)
    })??;
    let (recorder, stop) = (recorder.clone(), stop.clone());
    // The sockets were made in the client's namespace and stay there; the
    // thread only needs the namespace for reopening.
    client.spawn(move || {
        let mut idle = opened;
        let mut n = 0u64;
        loop {
            sleep_unless(&stop, every);
            if stop.load(Ordering::SeqCst) {
                return;
            }
            n += 1;
            for c in &mut idle {
                check_one(c, n, &recorder, &stop);
            }
        }
    })
}

fn check_one(c: &mut Idle, n: u64, recorder: &Recorder, stop: &AtomicBool) {
    let started = Instant::now();
    let outcome = match c.conn.as_mut() {
        Some(conn) => conn.still_works(n),
        None => Err(anyhow::anyhow!("not open")),
    };
    // A round of checks can outlast the soak (each push check waits for a
    // fresh push): once the end is called, the servers stop and what fails
    // is the teardown, not the datapath.
    if stop.load(Ordering::SeqCst) {
        return;
    }
    match outcome {
        Ok(()) => {
            recorder.record(c.kind, started, Ok(()));
            c.last_ok = Instant::now();
            return;
        }
        Err(e) if c.conn.is_some() => {
            // Broken since its last good check.
            recorder.record(
                c.kind,
                c.last_ok,
                Err(e.context(format!("an idle connection to {}", c.target))),
            );
        }
        Err(_) => {}
    }
    let reopened = Instant::now();
    match Conn::open(c.target, c.push) {
        Ok(conn) => {
            c.conn = Some(conn);
            c.last_ok = Instant::now();
            recorder.record(c.kind, reopened, Ok(()));
        }
        Err(e) => {
            c.conn = None;
            recorder.record(c.kind, reopened, Err(e.context("reopening")));
        }
    }
}
