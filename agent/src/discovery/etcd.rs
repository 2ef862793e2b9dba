//! etcd v3 discovery over etcd's JSON gateway (`/v3/kv/range`,
//! `/v3/watch`): every key under the prefix is one backend, its value
//! `{"address": "10.0.0.5:8080", "weight": 1}` (weight optional, default 1).
//!
//! The prefix is listed once, then watched from the list's revision. After a
//! disconnect the watch resumes from the last revision seen, so no change is
//! missed; only when etcd has compacted that revision away does it list again.
//!
//! What etcd sends is bounded: a list response or one watch message of at
//! most `MAX_MESSAGE_BYTES`, at most `MAX_PREFIX_BYTES` of keys and values
//! under the prefix, and a backend value of at most `MAX_VALUE_BYTES`. Over
//! a cap the answer is refused with a message naming it, and the last good
//! set keeps serving.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::Deserialize;
use serde_json::Value;
use tracing::info;

use super::{Backends, DiscoveryError, EtcdError, Outcome, Reporter};
use crate::config::Source;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A list request's limit.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest list response or watch message read (etcd's own request
/// limit is 1.5 MiB per value; base64 and JSON add a third).
const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// The most bytes of keys and values kept for one prefix.
const MAX_PREFIX_BYTES: usize = 8 << 20;
/// The largest backend value (`{"address": …, "weight": …}` takes < 100).
const MAX_VALUE_BYTES: usize = 4096;
/// Waits between attempts after a failure: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_LAST: Duration = Duration::from_secs(5);

/// The value of a backend key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendValue {
    address: String,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

/// What the watch has seen: every key's raw value, and the revision the
/// next watch starts after.
pub(super) struct Snapshot {
    pub(super) revision: i64,
    pub(super) values: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Snapshot {
    /// Keys and values held, refused over `MAX_PREFIX_BYTES`.
    fn check_size(&self) -> Result<(), EtcdError> {
        let bytes: usize = self.values.iter().map(|(k, v)| k.len() + v.len()).sum();
        if bytes > MAX_PREFIX_BYTES {
            return Err(EtcdError::TooLarge {
                what: format!("the prefix's keys and values ({bytes} bytes)"),
                limit: MAX_PREFIX_BYTES,
            });
        }
        Ok(())
    }
}

pub async fn run(source: Source, reporter: Reporter) {
    let Source::Etcd { endpoints, prefix } = source else {
        return;
    };
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(REQUEST_TIMEOUT));
    // A peer that vanishes without a FIN (a partition) is found by
    // keepalive probes rather than never.
    connector.set_keepalive(Some(Duration::from_secs(15)));
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
    let range = Range {
        key: STANDARD.encode(prefix.as_bytes()),
        range_end: STANDARD.encode(prefix_end(prefix.as_bytes())),
    };
    let mut snapshot: Option<Snapshot> = None;
    let mut wait = RETRY_FIRST;
    for endpoint in endpoints.iter().cycle() {
        let mut progressed = false;
        let error = session(
            &client,
            endpoint,
            &range,
            &mut snapshot,
            &reporter,
            &mut progressed,
        )
        .await;
        if reporter.tx.is_closed() {
            return;
        }
        if progressed {
            wait = RETRY_FIRST;
        }
        let endpoint = endpoint.clone();
        let error = DiscoveryError::Etcd { endpoint, error };
        if !reporter.send(Outcome::Failed(error)).await {
            return;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETRY_LAST);
    }
}

struct Range {
    key: String,
    range_end: String,
}

/// The key just past every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // the prefix is all 0xff: to the end of the keyspace
}

/// Lists (when there is no snapshot) and watches until the connection or
/// the watch ends; returns why.
async fn session(
    client: &HttpClient,
    endpoint: &str,
    range: &Range,
    snapshot: &mut Option<Snapshot>,
    reporter: &Reporter,
    progressed: &mut bool,
) -> EtcdError {
    if snapshot.is_none() {
        match list(client, endpoint, range).await {
            Ok(listed) => {
                *progressed = true;
                info!(
                    service = reporter.service,
                    endpoint,
                    revision = listed.revision,
                    keys = listed.values.len(),
                    "etcd prefix listed"
                );
                report(&listed, reporter).await;
                *snapshot = Some(listed);
            }
            Err(e) => return e,
        }
    }
    let Some(snap) = snapshot.as_mut() else {
        return EtcdError::NoSnapshot;
    };
    let body = serde_json::json!({"create_request": {
        "key": range.key,
        "range_end": range.range_end,
        "start_revision": (snap.revision + 1).to_string(),
        // Progress notifications move the resume point on a quiet prefix.
        "progress_notify": true,
    }});
    let response = match post(client, endpoint, "/v3/watch", &body).await {
        Ok(r) => r,
        Err(e) => return EtcdError::StartWatch(e),
    };
    info!(
        service = reporter.service,
        endpoint,
        from_revision = snap.revision + 1,
        "etcd watch started"
    );
    let mut body = response.into_body();
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        let frame = match body.frame().await {
            None => return EtcdError::StreamEnded,
            Some(Err(e)) => return EtcdError::StreamBroke(e),
            Some(Ok(frame)) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buffer.extend_from_slice(&data);
        if buffer.len() > MAX_MESSAGE_BYTES {
            // Resuming would bring the same message: list again.
            *snapshot = None;
            return EtcdError::TooLarge {
                what: "a watch message".into(),
                limit: MAX_MESSAGE_BYTES,
            };
        }
        // The gateway streams one JSON object per message; a message may
        // arrive in pieces.
        let mut stream = serde_json::Deserializer::from_slice(&buffer).into_iter::<Value>();
        let mut messages = Vec::new();
        let mut consumed = 0;
        while let Some(message) = stream.next() {
            match message {
                Ok(m) => {
                    messages.push(m);
                    consumed = stream.byte_offset();
                }
                Err(e) if e.is_eof() => break,
                Err(e) => return EtcdError::InvalidJson(e),
            }
        }
        buffer.drain(..consumed);
        for message in messages {
            match apply_watch_message(snap, &message).and_then(|changed| {
                snap.check_size()?;
                Ok(changed)
            }) {
                Ok(false) => {}
                Ok(true) => {
                    *progressed = true;
                    report(snap, reporter).await;
                }
                Err(why) => {
                    *snapshot = None;
                    return why;
                }
            }
        }
    }
}

/// Applies one watch message. Ok(true) when keys changed; an error means
/// the watch can't resume where it was: list again.
pub(super) fn apply_watch_message(snap: &mut Snapshot, message: &Value) -> Result<bool, EtcdError> {
    if let Some(error) = message.get("error") {
        return Err(EtcdError::WatchFailed(error.clone()));
    }
    let Some(result) = message.get("result") else {
        return Ok(false);
    };
    let compact = int(result.get("compact_revision"));
    if compact > 0 {
        return Err(EtcdError::Compacted {
            revision: snap.revision + 1,
            oldest: compact,
        });
    }
    if result.get("canceled").and_then(Value::as_bool) == Some(true) {
        let reason = result.get("cancel_reason").unwrap_or(&Value::Null);
        return Err(EtcdError::Canceled(reason.clone()));
    }
    let events = result.get("events").and_then(Value::as_array);
    let created = result.get("created").and_then(Value::as_bool) == Some(true);
    if events.is_none_or(|e| e.is_empty()) && !created {
        // A progress notification: every event up to the header's revision
        // has been sent.
        let header = int(result.get("header").and_then(|h| h.get("revision")));
        snap.revision = snap.revision.max(header);
    }
    let mut changed = false;
    for event in result
        .get("events")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let Some(kv) = event.get("kv") else { continue };
        let key = decode(kv.get("key"));
        snap.revision = snap.revision.max(int(kv.get("mod_revision")));
        if event.get("type").and_then(Value::as_str) == Some("DELETE") {
            changed |= snap.values.remove(&key).is_some();
        } else {
            let value = decode(kv.get("value"));
            changed |= snap.values.insert(key, value.clone()).as_ref() != Some(&value);
        }
    }
    Ok(changed)
}

async fn list(client: &HttpClient, endpoint: &str, range: &Range) -> Result<Snapshot, EtcdError> {
    let body = serde_json::json!({"key": range.key, "range_end": range.range_end});
    let timed_out = || EtcdError::List(format!("no answer in {REQUEST_TIMEOUT:?}"));
    let response = tokio::time::timeout(
        REQUEST_TIMEOUT,
        post(client, endpoint, "/v3/kv/range", &body),
    )
    .await
    .map_err(|_| timed_out())?
    .map_err(EtcdError::List)?;
    let limited = http_body_util::Limited::new(response.into_body(), MAX_MESSAGE_BYTES);
    let bytes = tokio::time::timeout(REQUEST_TIMEOUT, limited.collect())
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                EtcdError::TooLarge {
                    what: "the list response".into(),
                    limit: MAX_MESSAGE_BYTES,
                }
            } else {
                EtcdError::List(e.to_string())
            }
        })?
        .to_bytes();
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| EtcdError::List(format!("invalid JSON: {e}")))?;
    let header = value.get("header").ok_or_else(|| {
        let start = &bytes[..bytes.len().min(200)];
        EtcdError::List(format!("no header in {}", String::from_utf8_lossy(start)))
    })?;
    let mut values = BTreeMap::new();
    for kv in value
        .get("kvs")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        values.insert(decode(kv.get("key")), decode(kv.get("value")));
    }
    let snapshot = Snapshot {
        revision: int(header.get("revision")),
        values,
    };
    snapshot.check_size()?;
    Ok(snapshot)
}

async fn post(
    client: &HttpClient,
    endpoint: &str,
    path: &str,
    body: &Value,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let request = hyper::Request::post(format!("{}{path}", endpoint.trim_end_matches('/')))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| {
        // The connect error's cause says what happened (refused, timed out).
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text += &format!(": {s}");
            source = s.source();
        }
        text
    })?;
    if !response.status().is_success() {
        return Err(format!("HTTP {} from {path}", response.status()));
    }
    Ok(response)
}

/// The snapshot's backends, or why they can't be used (a value that is not
/// a backend): then the last good set stays.
async fn report(snap: &Snapshot, reporter: &Reporter) {
    let outcome = match backends(snap) {
        Ok(b) => Outcome::Backends(b),
        Err(e) => Outcome::Failed(e),
    };
    reporter.send(outcome).await;
}

pub(super) fn backends(snap: &Snapshot) -> Result<Backends, DiscoveryError> {
    snap.values
        .iter()
        .map(|(key, value)| {
            let key = String::from_utf8_lossy(key).into_owned();
            if value.len() > MAX_VALUE_BYTES {
                return Err(DiscoveryError::EtcdValueTooLarge {
                    key,
                    bytes: value.len(),
                    limit: MAX_VALUE_BYTES,
                });
            }
            let parsed: BackendValue =
                serde_json::from_slice(value).map_err(|error| DiscoveryError::EtcdValue {
                    key: key.clone(),
                    value: String::from_utf8_lossy(value).into_owned(),
                    error,
                })?;
            let addr: SocketAddr =
                parsed
                    .address
                    .parse()
                    .map_err(|_| DiscoveryError::EtcdAddress {
                        key,
                        address: parsed.address.clone(),
                    })?;
            Ok((addr, parsed.weight))
        })
        .collect()
}

/// etcd's JSON gateway writes int64 as strings.
fn int(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn decode(v: Option<&Value>) -> Vec<u8> {
    v.and_then(Value::as_str)
        .and_then(|s| STANDARD.decode(s).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_the_prefix() {
        assert_eq!(prefix_end(b"/svc/"), b"/svc0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn watch_events_put_and_delete_keys() {
        let mut snap = Snapshot {
            revision: 5,
            values: BTreeMap::new(),
        };
        let put = serde_json::json!({"result": {"events": [{"kv": {
            "key": STANDARD.encode("/s/a"), "value": STANDARD.encode(r#"{"address":"10.0.0.1:80"}"#),
            "mod_revision": "7"}}]}});
        assert!(apply_watch_message(&mut snap, &put).is_ok_and(|c| c));
        assert_eq!(snap.revision, 7);
        assert_eq!(
            backends(&snap).unwrap(),
            vec![("10.0.0.1:80".parse().unwrap(), 1)]
        );
        let delete = serde_json::json!({"result": {"events": [{"type": "DELETE", "kv": {
            "key": STANDARD.encode("/s/a"), "mod_revision": "8"}}]}});
        assert!(apply_watch_message(&mut snap, &delete).is_ok_and(|c| c));
        assert!(snap.values.is_empty());
        let compacted = serde_json::json!({"result": {"compact_revision": "20", "canceled": true}});
        assert!(apply_watch_message(&mut snap, &compacted).is_err());
    }

    #[test]
    fn oversized_values_and_prefixes_are_refused_by_name() {
        let big = vec![b' '; MAX_VALUE_BYTES + 1];
        let snap = Snapshot {
            revision: 1,
            values: BTreeMap::from([(b"/s/big".to_vec(), big)]),
        };
        assert_eq!(
            backends(&snap).unwrap_err().to_string(),
            "key /s/big: value of 4097 bytes, over the 4096-byte limit of a backend value"
        );
        assert!(snap.check_size().is_ok());
        let mut snap = Snapshot {
            revision: 1,
            values: BTreeMap::new(),
        };
        for i in 0..9u8 {
            snap.values.insert(vec![i], vec![0; 1 << 20]);
        }
        assert_eq!(
            snap.check_size().unwrap_err().to_string(),
            "the prefix's keys and values (9437193 bytes) is over the 8388608-byte limit"
        );
    }

    #[test]
    fn unusable_values_and_ended_sessions_say_why() {
        let snap = |value: &str| Snapshot {
            revision: 1,
            values: BTreeMap::from([(b"/s/junk".to_vec(), value.as_bytes().to_vec())]),
        };
        let e = backends(&snap(r#"{"address":"web:80"}"#)).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"key /s/junk: address "web:80" is not IP:PORT"#
        );
        let e = backends(&snap("nope")).unwrap_err().to_string();
        assert!(
            e.starts_with(
                r#"key /s/junk: value "nope" is not {"address": "IP:PORT", "weight": N}: "#
            ),
            "{e}"
        );
        let mut at_5 = Snapshot {
            revision: 5,
            values: BTreeMap::new(),
        };
        let compacted = serde_json::json!({"result": {"compact_revision": "20"}});
        let Err(why) = apply_watch_message(&mut at_5, &compacted) else {
            panic!("not compacted");
        };
        let error = DiscoveryError::Etcd {
            endpoint: "http://e:2379".into(),
            error: why,
        };
        assert_eq!(
            error.to_string(),
            "etcd http://e:2379: revision 6 was compacted (oldest kept 20); listing again"
        );
        // The text has the cause already: no source for a chain printer to
        // repeat.
        assert!(std::error::Error::source(&error).is_none());
    }
}
