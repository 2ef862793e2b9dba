//! A mock Kubernetes API server that speaks the real list/watch protocol
//! over HTTP/1.1 for Services (`/api/v1/services`) and EndpointSlices
//! (`/apis/discovery.k8s.io/v1/endpointslices`): lists with a
//! resourceVersion, chunked watch streams of `ADDED`/`MODIFIED`/`DELETED`
//! events from a given resourceVersion, label selectors (equality), `410
//! Gone` for an expired resourceVersion, and the ability to vanish and come
//! back. A kube-rs client pointed at it can't tell it from the real thing
//! for these two resources.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use testbed::Netns;

#[derive(Default)]
struct State {
    revision: u64,
    /// (kind, namespace, name) → object (with its resourceVersion).
    objects: BTreeMap<(String, String, String), Value>,
    /// (revision, kind, event type, object) of every change.
    log: Vec<(u64, String, &'static str, Value)>,
    /// Watches from before this revision get 410 Gone.
    oldest: u64,
    /// Bumped to end every open watch with 410 Gone.
    expiry: u64,
    /// Bumped when the server goes away: open connections close.
    epoch: u64,
    running: bool,
}

pub struct KubeMock {
    state: Arc<(Mutex<State>, Condvar)>,
    pub addr: SocketAddr,
    accept: Option<thread::JoinHandle<()>>,
}

impl KubeMock {
    /// Starts serving on `addr` inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let mut mock = Self {
            state: Arc::new((Mutex::new(State::default()), Condvar::new())),
            addr,
            accept: None,
        };
        mock.resume(ns)?;
        Ok(mock)
    }

    /// The API server comes (back) up, with the state it had.
    pub fn resume(&mut self, ns: &Netns) -> Result<()> {
        let addr = self.addr;
        let listener = ns.enter(move || TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let state = self.state.clone();
        let epoch = {
            let mut s = state.0.lock().unwrap();
            s.running = true;
            s.epoch
        };
        self.accept = Some(thread::spawn(move || {
            loop {
                {
                    let s = state.0.lock().unwrap();
                    if !s.running || s.epoch != epoch {
                        return; // dropping the listener closes the port
                    }
                }
                match listener.accept() {
                    Ok((conn, _)) => {
                        let state = state.clone();
                        thread::spawn(move || {
                            let _ = serve(conn, &state, epoch);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        }));
        Ok(())
    }

    /// The API server disappears: the port closes, open watches break.
    pub fn stop(&mut self) {
        {
            let mut s = self.state.0.lock().unwrap();
            s.running = false;
            s.epoch += 1;
        }
        self.state.1.notify_all();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }

    /// Every open watch ends with 410 Gone, and resuming from any revision
    /// seen so far is refused: clients must list again.
    pub fn expire_watches(&self) {
        let mut s = self.state.0.lock().unwrap();
        s.expiry += 1;
        s.oldest = s.revision + 1;
        drop(s);
        self.state.1.notify_all();
    }

    /// Creates or replaces an object (`kind`: Service or EndpointSlice).
    pub fn apply(&self, mut object: Value) {
        let kind = object["kind"].as_str().unwrap_or("").to_string();
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let mut s = self.state.0.lock().unwrap();
        s.revision += 1;
        let rv = s.revision;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["metadata"]["uid"] = json!(format!("uid-{kind}-{ns}-{name}"));
        let key = (kind.clone(), ns, name);
        let kind_of_event = if s.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.objects.insert(key, object.clone());
        s.log.push((rv, kind, kind_of_event, object));
        drop(s);
        self.state.1.notify_all();
    }

    pub fn delete(&self, kind: &str, ns: &str, name: &str) {
        let mut s = self.state.0.lock().unwrap();
        let Some(mut object) =
            s.objects
                .remove(&(kind.to_string(), ns.to_string(), name.to_string()))
        else {
            return;
        };
        s.revision += 1;
        let rv = s.revision;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.log.push((rv, kind.to_string(), "DELETED", object));
        drop(s);
        self.state.1.notify_all();
    }
}

impl Drop for KubeMock {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Request {
    kind: String,
    namespace: Option<String>,
    query: BTreeMap<String, String>,
}

fn parse_request(line: &str) -> Option<Request> {
    let target = line.split_whitespace().nth(1)?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (kind, namespace) = match parts.as_slice() {
        ["api", "v1", "services"] => ("Service", None),
        ["api", "v1", "namespaces", ns, "services"] => ("Service", Some(ns.to_string())),
        ["apis", "discovery.k8s.io", "v1", "endpointslices"] => ("EndpointSlice", None),
        [
            "apis",
            "discovery.k8s.io",
            "v1",
            "namespaces",
            ns,
            "endpointslices",
        ] => ("EndpointSlice", Some(ns.to_string())),
        _ => return None,
    };
    Some(Request {
        kind: kind.to_string(),
        namespace,
        query,
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Equality-based label selectors (`a=b,c!=d,e`), which is what Sluice sends.
fn selected(object: &Value, selector: Option<&String>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = &object["metadata"]["labels"];
    selector.split(',').all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels[k.trim()].as_str() != Some(v.trim())
        } else if let Some((k, v)) = term.split_once('=') {
            labels[k.trim().trim_end_matches('=')].as_str() == Some(v.trim())
        } else {
            !labels[term.trim()].is_null()
        }
    })
}

fn matches(req: &Request, kind: &str, object: &Value) -> bool {
    kind == req.kind
        && req
            .namespace
            .as_ref()
            .is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns))
        && selected(object, req.query.get("labelSelector"))
}

fn serve(conn: TcpStream, state: &Arc<(Mutex<State>, Condvar)>, epoch: u64) -> Result<()> {
    conn.set_nonblocking(false)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    let Some(req) = parse_request(&request_line) else {
        let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","code":404,"reason":"NotFound"}"#;
        write!(
            out,
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    };
    if req.query.get("watch").map(String::as_str) == Some("true")
        || req.query.get("watch").map(String::as_str) == Some("1")
    {
        return watch(out, state, epoch, &req);
    }
    let s = state.0.lock().unwrap();
    let items: Vec<Value> = s
        .objects
        .iter()
        .filter(|((kind, _, _), o)| matches(&req, kind, o))
        .map(|(_, o)| o.clone())
        .collect();
    let list_kind = format!("{}List", req.kind);
    let api_version = if req.kind == "Service" {
        "v1"
    } else {
        "discovery.k8s.io/v1"
    };
    let body = json!({
        "kind": list_kind,
        "apiVersion": api_version,
        "metadata": {"resourceVersion": s.revision.to_string()},
        "items": items,
    })
    .to_string();
    drop(s);
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

fn chunk(out: &mut TcpStream, line: &str) -> std::io::Result<()> {
    let data = format!("{line}\n");
    write!(out, "{:x}\r\n{data}\r\n", data.len())?;
    out.flush()
}

fn gone() -> String {
    json!({"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version", "reason": "Expired", "code": 410}})
    .to_string()
}

fn watch(
    mut out: TcpStream,
    state: &Arc<(Mutex<State>, Condvar)>,
    epoch: u64,
    req: &Request,
) -> Result<()> {
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    let mut since: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let limit = req
        .query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(300u64);
    let deadline = Instant::now() + Duration::from_secs(limit);
    let (lock, cvar) = &**state;
    let mut s = lock.lock().unwrap();
    let expiry = s.expiry;
    if since + 1 < s.oldest {
        drop(s);
        chunk(&mut out, &gone())?;
        return finish(out);
    }
    loop {
        if s.epoch != epoch || !s.running {
            return Ok(()); // the server went away: no clean end
        }
        if s.expiry != expiry {
            drop(s);
            chunk(&mut out, &gone())?;
            return finish(out);
        }
        let events: Vec<String> = s
            .log
            .iter()
            .filter(|(rv, kind, _, o)| *rv > since && matches(req, kind, o))
            .map(|(_, _, t, o)| json!({"type": t, "object": o}).to_string())
            .collect();
        since = s.revision;
        if !events.is_empty() {
            drop(s);
            for e in events {
                chunk(&mut out, &e).context("writing a watch event")?;
            }
            s = lock.lock().unwrap();
            continue;
        }
        if Instant::now() >= deadline {
            drop(s);
            return finish(out);
        }
        s = cvar.wait_timeout(s, Duration::from_millis(200)).unwrap().0;
    }
}

fn finish(mut out: TcpStream) -> Result<()> {
    write!(out, "0\r\n\r\n")?;
    out.flush()?;
    Ok(())
}
