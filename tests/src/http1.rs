//! HTTP/1.1 by hand, over TCP in a namespace or over the agent's Unix
//! control socket: one request per connection (`Connection: close`), the
//! whole answer (status, headers, body) kept, so tests can check what a
//! client really gets (content types, error bodies, `WWW-Authenticate`).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use testbed::Netns;

/// One answer. Header names are kept lower-case.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The media type of the body, without parameters (`text/plain`).
    pub fn media_type(&self) -> Option<&str> {
        self.header("content-type")
            .map(|t| t.split(';').next().unwrap_or("").trim())
    }
}

/// A request: method, path with its query, extra headers, and a JSON body.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub json: Option<&'a str>,
}

impl<'a> Request<'a> {
    pub fn get(path: &'a str) -> Self {
        Self {
            method: "GET",
            path,
            headers: &[],
            json: None,
        }
    }

    pub fn post_json(path: &'a str, json: &'a str) -> Self {
        Self {
            method: "POST",
            path,
            headers: &[],
            json: Some(json),
        }
    }

    pub fn with_headers(self, headers: &'a [(&'a str, &'a str)]) -> Self {
        Self { headers, ..self }
    }

    fn write_to(&self, stream: &mut impl Write) -> Result<()> {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n",
            self.method, self.path
        );
        for (name, value) in self.headers {
            head += &format!("{name}: {value}\r\n");
        }
        if let Some(json) = self.json {
            head += &format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                json.len()
            );
        }
        head += "\r\n";
        stream.write_all(head.as_bytes())?;
        if let Some(json) = self.json {
            stream.write_all(json.as_bytes())?;
        }
        stream.flush()?;
        Ok(())
    }
}

/// Sends `request` on `stream` and reads the whole answer (to the end of the
/// connection, or of the chunked body).
pub fn exchange<S: Read + Write>(mut stream: S, request: Request) -> Result<Response> {
    request.write_to(&mut stream)?;
    let mut reader = BufReader::new(stream);
    let mut response = read_head(&mut reader)?;
    let mut raw = Vec::new();
    reader.read_to_end(&mut raw)?;
    if response
        .header("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        raw = dechunk(&raw)?;
    }
    response.body = String::from_utf8(raw).context("a body that is not UTF-8")?;
    Ok(response)
}

/// Reads a response head (status line and headers; the body left unread).
pub fn read_head(reader: &mut impl BufRead) -> Result<Response> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status line: {line:?}"))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("the connection closed inside the response head");
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header
            .split_once(':')
            .with_context(|| format!("a header line without a colon: {header:?}"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Response {
        status,
        headers,
        body: String::new(),
    })
}

/// A chunked body's content.
fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("a chunk size line without its end")?;
        let size_text = std::str::from_utf8(&raw[..end])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("chunk size {size_text:?}"))?;
        raw = &raw[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size + 2 {
            bail!("a chunk of {size} bytes cut short");
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// `request` over TCP to `addr`, from inside `ns`.
pub fn over_tcp(ns: &Netns, addr: SocketAddr, request: Request) -> Result<Response> {
    ns.enter(|| -> Result<Response> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        exchange(stream, request)
    })?
    .with_context(|| format!("{} {} on {addr}", request.method, request.path))
}

/// `request` over the Unix socket at `socket` (the agent's control socket).
pub fn over_unix(socket: &Path, request: Request) -> Result<Response> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    exchange(stream, request).with_context(|| {
        format!(
            "{} {} on {}",
            request.method,
            request.path,
            socket.display()
        )
    })
}

/// A request whose answer is a stream (Server-Sent Events), opened from
/// inside `ns`: the head, and the connection to read the events from.
pub fn open_stream(
    ns: &Netns,
    addr: SocketAddr,
    request: Request,
) -> Result<(Response, BufReader<TcpStream>)> {
    ns.enter(|| -> Result<(Response, BufReader<TcpStream>)> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        request.write_to(&mut stream)?;
        let mut reader = BufReader::new(stream);
        let head = read_head(&mut reader)?;
        Ok((head, reader))
    })?
}

/// The next Server-Sent Event on a stream (read through its chunked
/// framing): its `event` name and its `data`. Comments (keep-alives) are
/// skipped.
pub fn next_event(reader: &mut impl BufRead) -> Result<(String, String)> {
    let (mut event, mut data) = (String::new(), String::new());
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("the event stream ended");
        }
        let text = line.trim_end_matches(['\r', '\n']);
        if let Some(name) = text.strip_prefix("event:") {
            event = name.trim().to_string();
        } else if let Some(d) = text.strip_prefix("data:") {
            data += d.strip_prefix(' ').unwrap_or(d);
        } else if text.is_empty() && !data.is_empty() {
            return Ok((event, data));
        }
        // Anything else: a chunk size line, or a comment.
    }
}
