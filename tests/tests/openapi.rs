//! docs/openapi.yaml against a real agent. Real traffic runs through it: one
//! backend stops answering (and is ejected), one is drained and others are
//! re-weighted by overrides posted on the control socket, a snat service
//! carries a held connection, and an event stream is followed. Every path
//! and method the description names is called; every answer's status, media
//! type, headers and body are checked against the description (its schemas
//! are strict: a property missing, unknown, or of the wrong type fails);
//! the described paths are the ones the agent routes (`sluice::api::ROUTES`);
//! and every property the description names shows up in some answer, but
//! for the few this topology can't produce (`NOT_EXERCISED`).

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use sluice_tests::{
    Agent, Bed, backends_reached,
    http1::{self, Request, Response},
    interfaces_yaml, wait_for,
};
use testbed::{Family, Topology};

const TOKEN: &str = "openapi-test-3f9c21d7";
const VIP: &str = "10.100.0.1:80";
const SNAT_VIP: &str = "10.100.0.1:81";

/// Properties no answer in this test carries, and why. The test fails if
/// one of them does show up (then it belongs to the checked ones).
const NOT_EXERCISED: &[(&str, &str, &str)] = &[
    (
        "Service",
        "discovery",
        "static backends: no discovery provider",
    ),
    ("Discovery", "*", "static backends: no discovery provider"),
    (
        "DiscoveryStatus",
        "*",
        "static backends: no discovery provider",
    ),
    (
        "Backend",
        "drain_remaining_seconds",
        "only a backend that left discovery",
    ),
    ("Backend", "namespace", "Kubernetes backends only"),
    ("Backend", "pod", "Kubernetes backends only"),
];

/// The description, parsed.
struct Spec {
    doc: Value,
}

/// What the answers showed: the operations that answered 2xx, and the
/// (schema, property) pairs seen.
#[derive(Default)]
struct Seen {
    operations: BTreeSet<(String, String)>,
    properties: BTreeSet<(String, String)>,
}

impl Spec {
    fn load() -> Result<Self> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.yaml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let doc: Value = serde_saphyr::from_str(&text)
            .with_context(|| format!("parsing {} as YAML", path.display()))?;
        ensure!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1")),
            "docs/openapi.yaml is not OpenAPI 3.1: {}",
            doc["openapi"]
        );
        Ok(Self { doc })
    }

    /// `value`, or what its `$ref` (inside this document) points at.
    fn resolve<'a>(&'a self, value: &'a Value) -> Result<&'a Value> {
        match value.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let pointer = reference
                    .strip_prefix('#')
                    .with_context(|| format!("$ref {reference} points outside the document"))?;
                let target = self
                    .doc
                    .pointer(pointer)
                    .with_context(|| format!("$ref {reference} points at nothing"))?;
                self.resolve(target)
            }
            None => Ok(value),
        }
    }

    /// Every (path, method) described.
    fn operations(&self) -> Vec<(String, String)> {
        let methods = ["get", "put", "post", "delete", "patch", "head", "options"];
        self.doc["paths"]
            .as_object()
            .into_iter()
            .flatten()
            .flat_map(|(path, item)| {
                methods
                    .iter()
                    .filter(|m| item.get(**m).is_some())
                    .map(|m| (path.clone(), m.to_string()))
            })
            .collect()
    }

    fn operation(&self, path: &str, method: &str) -> Result<&Value> {
        self.doc["paths"]
            .get(path)
            .and_then(|p| p.get(method))
            .with_context(|| format!("{method} {path} is not described"))
    }

    /// A schema that validates like `schema`, its `$ref`s resolved in this
    /// document: the schema with the document's components beside it, so
    /// `#/components/schemas/…` points at them (OpenAPI 3.1 schemas are
    /// JSON Schema 2020-12).
    fn validator(&self, schema: &Value) -> Result<jsonschema::Validator> {
        let mut root = match schema {
            Value::Object(_) => schema.clone(),
            _ => bail!("a schema that is not an object: {schema}"),
        };
        root["components"] = self.doc["components"].clone();
        jsonschema::draft202012::new(&root)
            .map_err(|e| anyhow::anyhow!("the schema {schema} does not compile: {e}"))
    }

    /// Checks `instance` against `schema` (what: where it came from), and
    /// notes the properties it shows.
    fn validate(
        &self,
        what: &str,
        schema: &Value,
        instance: &Value,
        seen: &mut Seen,
    ) -> Result<()> {
        let validator = self.validator(schema)?;
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .map(|e| format!("  at {:?}: {e}", e.instance_path().as_str()))
            .collect();
        if !errors.is_empty() {
            let mut shown = instance.to_string();
            shown.truncate(2000);
            bail!(
                "{what} does not match docs/openapi.yaml ({} errors):\n{}\nthe answer: {shown}",
                errors.len(),
                errors[..errors.len().min(10)].join("\n")
            );
        }
        self.note_properties(schema, instance, "", &mut seen.properties)
    }

    /// Records which described properties `instance` has, walking it
    /// together with its schema.
    fn note_properties(
        &self,
        schema: &Value,
        instance: &Value,
        owner: &str,
        seen: &mut BTreeSet<(String, String)>,
    ) -> Result<()> {
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            let name = reference
                .strip_prefix("#/components/schemas/")
                .with_context(|| format!("$ref {reference} is not a component schema"))?;
            return self.note_properties(self.resolve(schema)?, instance, name, seen);
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            for branch in schema
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if self.validator(branch)?.is_valid(instance) {
                    self.note_properties(branch, instance, owner, seen)?;
                }
            }
        }
        match instance {
            Value::Object(map) => {
                for (name, value) in map {
                    if let Some(property) = schema.get("properties").and_then(|p| p.get(name)) {
                        seen.insert((owner.to_string(), name.clone()));
                        self.note_properties(property, value, owner, seen)?;
                    } else if let Some(values) =
                        schema.get("additionalProperties").filter(|a| a.is_object())
                    {
                        self.note_properties(values, value, owner, seen)?;
                    }
                }
            }
            Value::Array(items) => {
                if let Some(item) = schema.get("items") {
                    for i in items {
                        self.note_properties(item, i, owner, seen)?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Every (schema, property) the components describe.
    fn described_properties(&self) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for (name, schema) in self.doc["components"]["schemas"]
            .as_object()
            .into_iter()
            .flatten()
        {
            let branches = ["anyOf", "oneOf", "allOf"].iter().flat_map(|k| {
                schema
                    .get(*k)
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
            });
            for s in std::iter::once(schema).chain(branches) {
                for property in s["properties"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|p| p.0)
                {
                    out.insert((name.clone(), property.clone()));
                }
            }
        }
        out
    }

    /// Checks one answer of `method path` against its description: the
    /// status is described, and so are the media type, the headers and the
    /// body. A 2xx marks the operation as exercised.
    fn check(&self, method: &str, path: &str, answer: &Response, seen: &mut Seen) -> Result<()> {
        let what = format!("{} {path} → {}", method.to_uppercase(), answer.status);
        let operation = self.operation(path, method)?;
        let response = operation["responses"]
            .get(answer.status.to_string())
            .with_context(|| {
                format!(
                    "{what}: that status is not described; body: {}",
                    answer.body
                )
            })?;
        let response = self.resolve(response)?;
        for (name, header) in response["headers"].as_object().into_iter().flatten() {
            let value = answer
                .header(name)
                .with_context(|| format!("{what}: no {name} header, described"))?;
            let schema = self.resolve(&header["schema"])?;
            let value = if schema["type"] == "integer" {
                json!(
                    value
                        .parse::<i64>()
                        .with_context(|| format!("{what}: {name}: {value}"))?
                )
            } else {
                json!(value)
            };
            self.validate(&format!("{what}: header {name}"), schema, &value, seen)?;
        }
        if let Some(content) = response.get("content").and_then(Value::as_object) {
            let media = answer.media_type().unwrap_or("(none)");
            let described = content.get(media).with_context(|| {
                format!(
                    "{what}: media type {media} is not described (described: {:?})",
                    content.keys().collect::<Vec<_>>()
                )
            })?;
            let schema = &described["schema"];
            match media {
                "application/json" => {
                    let body: Value = serde_json::from_str(&answer.body).with_context(|| {
                        format!("{what}: a body that is not JSON: {}", answer.body)
                    })?;
                    self.validate(&what, schema, &body, seen)?;
                }
                // A stream's events are checked one by one (`check_event`).
                "text/event-stream" => {}
                _ => self.validate(&what, schema, &json!(answer.body), seen)?,
            }
        }
        if (200..300).contains(&answer.status) {
            seen.operations
                .insert((path.to_string(), method.to_string()));
        }
        Ok(())
    }

    /// Checks one Server-Sent Event of `path` against the schema the
    /// description names for its data.
    fn check_event(&self, path: &str, event: &str, data: &str, seen: &mut Seen) -> Result<Value> {
        let media =
            &self.operation(path, "get")?["responses"]["200"]["content"]["text/event-stream"];
        let schema = media
            .get("x-sluice-event-data")
            .with_context(|| format!("GET {path}: no x-sluice-event-data schema"))?;
        let data: Value = serde_json::from_str(data)
            .with_context(|| format!("GET {path}: event data that is not JSON: {data}"))?;
        self.validate(&format!("GET {path}: event {event}"), schema, &data, seen)?;
        Ok(data)
    }

    fn request_schema(&self, path: &str, method: &str) -> Result<&Value> {
        self.operation(path, method)?["requestBody"]["content"]["application/json"]
            .get("schema")
            .with_context(|| format!("{method} {path}: no JSON request body described"))
    }
}

/// Two TCP services on one VIP: `web` (four backends; an ejection needs one
/// client only and lasts the whole test) and `web-snat`.
fn config() -> String {
    let mut text = interfaces_yaml(4);
    text += "services:\n  - name: web\n    vip: 10.100.0.1\n    port: 80\n    protocol: tcp\n    failure:\n      min_distinct_clients: 1\n      ejection_seconds: 300\n    backends:\n";
    for i in 0..4 {
        text += &format!("      - address: 10.1.{i}.2:8080\n");
    }
    text += &format!(
        "  - name: web-snat\n    vip: 10.100.0.1\n    port: 81\n    protocol: tcp\n    forwarding: snat\n    snat_ip: {}\n    backends:\n      - address: 10.1.0.2:8080\n",
        Family::V4.snat()
    );
    // Every service option the API reports, so that each described
    // property shows up in a live answer.
    text += "  - name: web-options\n    vip: 10.100.0.1\n    port: 82\n    protocol: tcp\n    algorithm: least_connections\n    affinity: {client_ip: {timeout_seconds: 60}}\n    allowed_sources: [10.0.0.0/8, \"fd00::/8\"]\n    backends:\n      - address: 10.1.0.2:8080\n";
    text += "  - name: web-dsr\n    vip: 10.100.0.1\n    port: 8080\n    protocol: tcp\n    forwarding: dsr\n    dsr: {encapsulation: none}\n    backends:\n      - address: 10.1.0.2:8080\n";
    text
}

/// A connection from the client to `vip` that stays open (the backend
/// echoes), once the backend has answered.
fn held_connection(topo: &Topology, vip: &str) -> Result<TcpStream> {
    let vip: SocketAddr = vip.parse()?;
    topo.client
        .enter(move || -> Result<TcpStream> {
            let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(b"echo\n")?;
            let mut name = [0u8; 64];
            ensure!(s.read(&mut name)? > 0, "no answer through {vip}");
            Ok(s)
        })?
        .with_context(|| format!("a held connection to {vip}"))
}

/// The agent under test and the ways to reach it.
struct Target {
    http: SocketAddr,
    socket: PathBuf,
}

const AUTH: &[(&str, &str)] = &[("Authorization", "Bearer openapi-test-3f9c21d7")];

#[test]
fn every_answer_matches_the_openapi_description() -> Result<()> {
    let spec = Spec::load()?;
    let mut seen = Seen::default();

    // The description's paths are exactly the ones the agent routes.
    let described: BTreeSet<&str> = spec.doc["paths"]
        .as_object()
        .context("no paths")?
        .keys()
        .map(String::as_str)
        .collect();
    let routed: BTreeSet<&str> = sluice::api::ROUTES.iter().copied().collect();
    assert_eq!(
        described, routed,
        "docs/openapi.yaml's paths (left) and sluice::api::ROUTES (right) differ"
    );
    ensure!(AUTH[0].1.ends_with(TOKEN));

    let mut bed = Bed::new("oapi", 4)?;
    let cfg = bed.dir.path("sluice.yaml");
    std::fs::write(&cfg, config())?;
    let token_file = bed.dir.path("api-token");
    std::fs::write(&token_file, format!("{TOKEN}\n"))?;
    // The API exposed on the LB's client-side address: every request below
    // comes from the client's namespace with the bearer token.
    let exposed = SocketAddr::new(Family::V4.client_gateway(), 9464);
    let agent = Agent::start_on(
        &bed.topo.lb,
        &cfg,
        bed.dir.path("agent.log"),
        exposed,
        &[
            "--api-listen",
            &exposed.to_string(),
            "--api-token-file",
            token_file.to_str().context("token path")?,
        ],
    )?;
    let target = Target {
        http: exposed,
        socket: sluice_tests::control_socket_of(&cfg),
    };
    let result = exercise(&spec, &mut seen, &mut bed, &target);
    if result.is_err() {
        eprintln!("agent log:\n{}", agent.log_text());
    }
    result?;

    // Every described operation answered 2xx at least once.
    let missed: Vec<_> = spec
        .operations()
        .into_iter()
        .filter(|op| !seen.operations.contains(op))
        .collect();
    assert!(missed.is_empty(), "never exercised: {missed:?}");

    // Every described property showed up, except those listed.
    let skipped = |(schema, property): &(String, String)| {
        NOT_EXERCISED
            .iter()
            .any(|(s, p, _)| s == schema && (*p == "*" || p == property))
    };
    let unseen: Vec<_> = spec
        .described_properties()
        .into_iter()
        .filter(|p| !seen.properties.contains(p) && !skipped(p))
        .collect();
    assert!(
        unseen.is_empty(),
        "described but in no answer (gone from the code?): {unseen:?}"
    );
    let listed_but_seen: Vec<_> = seen.properties.iter().filter(|p| skipped(p)).collect();
    assert!(
        listed_but_seen.is_empty(),
        "in NOT_EXERCISED but seen: {listed_but_seen:?}"
    );
    Ok(())
}

/// Traffic, overrides, and every endpoint called and checked.
fn exercise(spec: &Spec, seen: &mut Seen, bed: &mut Bed, target: &Target) -> Result<()> {
    let client = &bed.topo.client;
    let get = |path_and_query: &str| -> Result<Response> {
        http1::over_tcp(
            client,
            target.http,
            Request::get(path_and_query).with_headers(AUTH),
        )
    };
    let socket = |request: Request| http1::over_unix(&target.socket, request);
    // Checks `answer` to `method path…` and that its status is `expected`.
    let expect =
        |seen: &mut Seen, method: &str, path_and_query: &str, answer: &Response, expected: u16| {
            let path = path_and_query.split('?').next().unwrap_or_default();
            ensure!(
                answer.status == expected,
                "{method} {path_and_query}: {} (expected {expected}): {}",
                answer.status,
                answer.body
            );
            spec.check(method, path, answer, seen)
        };

    // Backend 2 stops answering: its refused connects are retried on the
    // others and eject it.
    drop(bed.servers.remove(2));
    backends_reached(&bed.topo, VIP.parse()?, 60)?;
    wait_for(
        "backend 10.1.2.2:8080 ejected",
        Duration::from_secs(10),
        || {
            let services: Value =
                serde_json::from_str(&socket(Request::get("/api/v1/services"))?.body)?;
            Ok(services["services"][0]["backends"][2]["state"] == "ejected")
        },
    )?;
    let held = held_connection(&bed.topo, VIP)?;
    let _held_snat = held_connection(&bed.topo, SNAT_VIP)?;

    // Overrides, posted on the control socket; each body is checked against
    // the request schema first.
    let overrides = "/api/v1/overrides";
    let change_schema = spec.request_schema(overrides, "post")?;
    let changes = [
        json!({"service": "web", "backend": "10.1.1.2:8080", "action": "drain"}),
        json!({"service": "web", "backend": "10.1.3.2:8080", "action": "weight", "weight": 3}),
        json!({"service": "web", "backend": "10.1.3.2:8080", "action": "drain"}),
        json!({"service": "web", "backend": "10.1.3.2:8080", "action": "undrain"}),
        json!({"service": "web", "backend": "10.1.0.2:8080", "action": "weight", "weight": 2}),
        json!({"service": "web", "backend": "10.1.0.2:8080", "action": "clear_weight"}),
    ];
    for change in &changes {
        spec.validate("an override change", change_schema, change, seen)?;
        let answer = socket(Request::post_json(overrides, &change.to_string()))?;
        expect(seen, "post", overrides, &answer, 200)?;
    }
    // Refused changes: an unknown backend, a body that is not JSON, one
    // without an action; and any change over HTTP.
    let unknown = json!({"service": "web", "backend": "10.9.9.9:80", "action": "drain"});
    let answer = socket(Request::post_json(overrides, &unknown.to_string()))?;
    expect(seen, "post", overrides, &answer, 422)?;
    ensure!(answer.body.contains("10.9.9.9:80"), "{}", answer.body);
    let answer = socket(Request::post_json(overrides, "{not json"))?;
    expect(seen, "post", overrides, &answer, 400)?;
    let no_action = r#"{"service": "web", "backend": "10.1.0.2:8080"}"#;
    expect(
        seen,
        "post",
        overrides,
        &socket(Request::post_json(overrides, no_action))?,
        422,
    )?;
    for (path, method) in spec
        .operations()
        .iter()
        .map(|(p, m)| (p.as_str(), m.as_str()))
    {
        if spec.operation(path, method)?["x-sluice-control-socket-only"] == true {
            let request = Request {
                method: &method.to_uppercase(),
                path,
                headers: AUTH,
                json: Some(&changes[0].to_string()),
            };
            let answer = http1::over_tcp(client, target.http, request)?;
            expect(seen, method, path, &answer, 405)?;
        }
    }

    // A followed event stream: a new connection's events arrive, each one
    // an Event as described, its SSE name its kind.
    let events = "/api/v1/events?service=web";
    let (head, mut stream) =
        http1::open_stream(client, target.http, Request::get(events).with_headers(AUTH))?;
    expect(seen, "get", events, &head, 200)?;
    backends_reached(&bed.topo, VIP.parse()?, 1)?;
    let mut kinds = BTreeSet::new();
    while !kinds.contains("close") {
        let (name, data) = http1::next_event(&mut stream)?;
        let event = spec.check_event("/api/v1/events", &name, &data, seen)?;
        ensure!(event["kind"] == name.as_str(), "event {name}: {event}");
        ensure!(event["service"] == "web", "filtered to web: {event}");
        kinds.insert(name);
    }
    drop(stream);

    // Health and metrics.
    expect(seen, "get", "/healthz", &get("/healthz")?, 200)?;
    expect(seen, "get", "/readyz", &get("/readyz")?, 200)?;
    let metrics = get("/metrics")?;
    expect(seen, "get", "/metrics", &metrics, 200)?;
    ensure!(metrics.body.contains("sluice_build_info"));

    // The API, with the traffic and overrides above in its answers.
    let page = get("/")?;
    expect(seen, "get", "/", &page, 200)?;
    ensure!(
        page.body.contains("<html"),
        "the dashboard page: {}",
        page.body
    );
    for path in [
        "/api/v1/status",
        "/api/v1/services",
        "/api/v1/dashboard",
        "/api/v1/overrides",
        "/api/v1/conntrack",
        "/api/v1/conntrack?service=web&backend=10.1.0.2:8080&limit=2",
        "/api/v1/events/recent",
        "/api/v1/events/recent?service=web&kind=fail&limit=5",
        "/api/v1/events/recent?kind=eject",
    ] {
        expect(seen, "get", path, &get(path)?, 200)?;
    }
    // The same over the control socket, without a token.
    for path in ["/api/v1/status", "/api/v1/overrides", "/api/v1/services"] {
        expect(seen, "get", path, &socket(Request::get(path))?, 200)?;
    }
    let services: Value = serde_json::from_str(&get("/api/v1/services")?.body)?;
    let states: Vec<(&str, &str)> = services["services"][0]["backends"]
        .as_array()
        .context("backends")?
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap_or(""),
                b["state"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("10.1.0.2:8080", "active"),
            ("10.1.1.2:8080", "draining"),
            ("10.1.2.2:8080", "ejected"),
            ("10.1.3.2:8080", "active"),
        ],
        "{services}"
    );
    let snat_flows: Value = serde_json::from_str(&get("/api/v1/conntrack?service=web-snat")?.body)?;
    ensure!(
        snat_flows["flows"][0]["snat"].is_string(),
        "the snat service's held flow names its source: {snat_flows}"
    );

    // Explanations: the held flow (its conntrack entry decides), a new flow
    // (Maglev decides; the drained backend is in no slot), and no service.
    let explain = |client: &str, frontend: &str| {
        format!("/api/v1/explain?client={client}&frontend={frontend}")
    };
    let held_path = explain(&held.local_addr()?.to_string(), &format!("{VIP}/tcp"));
    let answer = get(&held_path)?;
    expect(seen, "get", &held_path, &answer, 200)?;
    let held_answer: Value = serde_json::from_str(&answer.body)?;
    ensure!(
        held_answer["decision"] == "conntrack" && held_answer["flow"].is_object(),
        "{held_answer}"
    );
    let new_path = explain(
        &format!("{}:20001", Family::V4.client()),
        &format!("{VIP}/tcp"),
    );
    let answer = get(&new_path)?;
    expect(seen, "get", &new_path, &answer, 200)?;
    let new_answer: Value = serde_json::from_str(&answer.body)?;
    ensure!(
        new_answer["decision"] == "maglev"
            && new_answer["not_in_table"] == json!(["10.1.1.2:8080"]),
        "{new_answer}"
    );
    let nothing = explain(
        &format!("{}:20001", Family::V4.client()),
        "10.100.0.1:9999/tcp",
    );
    expect(seen, "get", &nothing, &get(&nothing)?, 200)?;

    // Errors: bad query input, and the gate without the token.
    let bad = explain("not-an-address", &format!("{VIP}/tcp"));
    let answer = get(&bad)?;
    expect(seen, "get", &bad, &answer, 400)?;
    ensure!(
        answer.body.contains("not-an-address"),
        "names the value: {}",
        answer.body
    );
    expect(
        seen,
        "get",
        "/api/v1/conntrack?limit=many",
        &get("/api/v1/conntrack?limit=many")?,
        400,
    )?;
    let anonymous = http1::over_tcp(client, target.http, Request::get("/api/v1/status"))?;
    expect(seen, "get", "/api/v1/status", &anonymous, 401)?;
    Ok(())
}
