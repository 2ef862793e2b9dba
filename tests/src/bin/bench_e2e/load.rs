//! The load: wrk for HTTP (keep-alive requests, and new connections with
//! `Connection: close`), sockperf ping-pong for UDP request/response. Both
//! run in the client's namespace on the load CPU; their own reports are
//! parsed, nothing is timed here.

use std::{net::SocketAddr, process::Output};

use anyhow::{Context, Result, bail};
use testbed::Netns;

use crate::cpu::{LOAD_CPU, on_cpu};

/// What one wrk run reports.
#[derive(Clone, Copy, Debug)]
pub struct Http {
    pub per_second: f64,
    pub requests: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Socket errors (connect, read, write, timeout) and non-2xx answers.
    pub errors: u64,
}

/// What one sockperf ping-pong run reports.
#[derive(Clone, Copy, Debug)]
pub struct Udp {
    pub per_second: f64,
    pub requests: u64,
    /// sockperf's latency: half the round trip, in microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
}

/// wrk from the client to `target` for `seconds` with `connections`
/// connections; with `close`, every request is a new connection.
pub fn wrk(
    client: &Netns,
    target: SocketAddr,
    close: bool,
    seconds: u32,
    connections: u32,
) -> Result<Http> {
    let url = format!("http://{target}/");
    let duration = format!("{seconds}s");
    let conns = connections.to_string();
    let mut args = vec!["wrk", "-t1", "-c", &conns, "-d", &duration, "--latency"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(&url);
    let out = on_cpu(client, LOAD_CPU, &args)
        .output()
        .context("running wrk (Debian package wrk)")?;
    let text = checked("wrk", &url, &out)?;
    parse_wrk(&text).with_context(|| format!("wrk's report for {url}:\n{text}"))
}

fn parse_wrk(text: &str) -> Result<Http> {
    let mut http = Http {
        per_second: f64::NAN,
        requests: 0,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        errors: 0,
    };
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => http.per_second = v.parse()?,
            ["50%", v] => http.p50_ms = millis(v)?,
            ["99%", v] => http.p99_ms = millis(v)?,
            [n, "requests", "in", ..] => http.requests = n.parse()?,
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                for v in rest.iter().skip(1).step_by(2) {
                    http.errors += v.trim_end_matches(',').parse::<u64>()?;
                }
            }
            ["Non-2xx", "or", "3xx", "responses:", v] => http.errors += v.parse::<u64>()?,
            _ => {}
        }
    }
    if http.per_second.is_nan() || http.p99_ms.is_nan() {
        bail!("no Requests/sec or latency distribution");
    }
    Ok(http)
}

/// wrk's durations: "812.00us", "1.23ms", "2.01s".
fn millis(v: &str) -> Result<f64> {
    let (number, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e3)
    } else {
        bail!("duration {v:?} without a unit");
    };
    Ok(number
        .parse::<f64>()
        .with_context(|| format!("duration {v:?}"))?
        * scale)
}

/// sockperf ping-pong from the client to `target` for `seconds`, one
/// request in flight, as fast as the answers come.
pub fn sockperf(client: &Netns, target: SocketAddr, seconds: u32) -> Result<Udp> {
    let (ip, port, secs) = (
        target.ip().to_string(),
        target.port().to_string(),
        seconds.to_string(),
    );
    let args = [
        "sockperf",
        "ping-pong",
        "-i",
        &ip,
        "-p",
        &port,
        "-t",
        &secs,
        "--mps",
        "max",
    ];
    let out = on_cpu(client, LOAD_CPU, &args)
        .output()
        .context("running sockperf (Debian package sockperf)")?;
    let text = checked("sockperf", &target.to_string(), &out)?;
    parse_sockperf(&text).with_context(|| format!("sockperf's report for {target}:\n{text}"))
}

fn parse_sockperf(text: &str) -> Result<Udp> {
    let mut udp = Udp {
        per_second: f64::NAN,
        requests: 0,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
    };
    for line in text.lines() {
        let line = line.trim_start_matches("sockperf: ");
        if let Some(rest) = line.strip_prefix("[Valid Duration] RunTime=") {
            // "0.550 sec; SentMessages=137616; ReceivedMessages=137616"
            let seconds: f64 = rest.split_whitespace().next().unwrap_or("").parse()?;
            let received = rest
                .rsplit_once("ReceivedMessages=")
                .context("no ReceivedMessages")?
                .1
                .trim()
                .parse::<u64>()?;
            udp.requests = received;
            udp.per_second = received as f64 / seconds;
        } else if let Some(v) = line.strip_prefix("---> percentile 50.000 =") {
            udp.p50_us = v.trim().parse()?;
        } else if let Some(v) = line.strip_prefix("---> percentile 99.000 =") {
            udp.p99_us = v.trim().parse()?;
        }
    }
    if udp.per_second.is_nan() || udp.p99_us.is_nan() {
        bail!("no run time, message count or percentiles");
    }
    Ok(udp)
}

/// The tool's standard output, or its failure with what it printed.
fn checked(tool: &str, target: &str, out: &Output) -> Result<String> {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{tool} to {target} failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_reports_are_read_with_their_units_and_errors() -> Result<()> {
        let text = "Running 3s test @ http://10.100.0.1:80/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.33us  101.20us   4.01ms   90.00%
  Latency Distribution
     50%  800.00us
     75%    1.10ms
     90%    1.50ms
     99%    2.01s
  45000 requests in 3.00s, 6.00MB read
  Socket errors: connect 1, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:  15000.50
Transfer/sec:      2.00MB
";
        let h = parse_wrk(text)?;
        assert_eq!(h.requests, 45_000);
        assert_eq!(h.per_second, 15_000.5);
        assert!((h.p50_ms - 0.8).abs() < 1e-9);
        assert!((h.p99_ms - 2010.0).abs() < 1e-9);
        assert_eq!(h.errors, 10);
        assert!(parse_wrk("Requests/sec: 1\n").is_err());
        Ok(())
    }

    #[test]
    fn sockperf_reports_give_the_rate_over_the_valid_duration() -> Result<()> {
        let text =
            "sockperf: [Valid Duration] RunTime=0.500 sec; SentMessages=1000; ReceivedMessages=999
sockperf: ---> percentile 99.000 =    2.259
sockperf: ---> percentile 50.000 =    1.837
";
        let u = parse_sockperf(text)?;
        assert_eq!(u.requests, 999);
        assert_eq!(u.per_second, 1998.0);
        assert_eq!(u.p50_us, 1.837);
        assert_eq!(u.p99_us, 2.259);
        Ok(())
    }
}
