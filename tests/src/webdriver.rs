//! Just enough of the W3C WebDriver protocol (plain HTTP + JSON) to drive
//! Debian's headless Chromium through Debian's ChromeDriver, both started
//! inside a network namespace: open a page, run a script, take a screenshot.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use testbed::Netns;

use crate::TempDir;

pub struct Browser<'a> {
    ns: &'a Netns,
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: TempDir,
}

fn request(ns: &Netns, addr: SocketAddr, method: &str, path: &str, body: &Value) -> Result<Value> {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let payload = ns.enter(|| -> Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        // The server may keep the connection open: read by Content-Length.
        let mut raw = Vec::new();
        let mut buf = [0u8; 65536];
        let header_end = loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                bail!("connection closed before the response headers");
            }
            raw.extend_from_slice(&buf[..n]);
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&raw[..header_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .context("a Content-Length header")?;
        while raw.len() < header_end + length {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&raw[header_end..]).into_owned())
    })??;
    let value: Value = serde_json::from_str(&payload)
        .with_context(|| format!("{method} {path}: not JSON: {payload}"))?;
    if let Some(err) = value["value"].get("error") {
        bail!("{method} {path}: {err}: {}", value["value"]["message"]);
    }
    Ok(value["value"].clone())
}

impl<'a> Browser<'a> {
    /// Starts ChromeDriver in `ns` and a headless Chromium session.
    pub fn start(ns: &'a Netns) -> Result<Self> {
        let port = 9515;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let driver = Command::new("ip")
            .args(["netns", "exec", &ns.name, "chromedriver"])
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver (Debian package chromium-driver)")?;
        let profile = TempDir::new("chromium")?;
        let mut browser = Self {
            ns,
            driver,
            addr,
            session: String::new(),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if request(ns, addr, "GET", "/status", &Value::Null).is_ok_and(|v| v["ready"] == true) {
                break;
            }
            if Instant::now() > deadline {
                bail!("chromedriver not ready within 20 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile_dir = browser._profile.0.display().to_string();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--window-size=1400,1300", format!("--user-data-dir={profile_dir}"),
                ]
            }
        }}});
        let session = request(ns, addr, "POST", "/session", &caps)?;
        browser.session = session["sessionId"]
            .as_str()
            .context("sessionId")?
            .to_string();
        Ok(browser)
    }

    pub fn open(&self, url: &str) -> Result<()> {
        request(
            self.ns,
            self.addr,
            "POST",
            &format!("/session/{}/url", self.session),
            &json!({"url": url}),
        )?;
        Ok(())
    }

    /// Runs `script` (a function body) in the page and returns its value.
    pub fn eval(&self, script: &str) -> Result<Value> {
        request(
            self.ns,
            self.addr,
            "POST",
            &format!("/session/{}/execute/sync", self.session),
            &json!({"script": script, "args": []}),
        )
    }

    /// A PNG screenshot of the viewport.
    pub fn screenshot(&self) -> Result<Vec<u8>> {
        let b64 = request(
            self.ns,
            self.addr,
            "GET",
            &format!("/session/{}/screenshot", self.session),
            &Value::Null,
        )?;
        use base64::Engine;
        Ok(
            base64::engine::general_purpose::STANDARD
                .decode(b64.as_str().context("screenshot")?)?,
        )
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = request(
                self.ns,
                self.addr,
                "DELETE",
                &format!("/session/{}", self.session),
                &Value::Null,
            );
        }
        // SAFETY: signalling the chromedriver this struct started, by its PID.
        unsafe { libc::kill(self.driver.id() as i32, libc::SIGTERM) };
        let _ = self.driver.wait();
    }
}
