use super::*;
use crate::config::MAX_WEIGHT;

fn config(vip: &str) -> Validated {
    let text = format!(
        "interfaces: [{{name: lb0}}]\nservices:\n  - name: web\n    vip: \"{vip}\"\n    port: 80\n    protocol: tcp\n    discovery:\n      dns: {{name: _http._tcp.web.example}}\n"
    );
    crate::config::parse(&text, "c.yaml").unwrap()
}

fn spec(vip: &str) -> ServiceSpec {
    config(vip).services.remove(0)
}

fn at(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// What a refused answer leaves in the provider's status, through the hub.
fn refused(vip: &str, found: Backends) -> String {
    let mut hub = Hub::default();
    hub.statuses.insert("web".into(), Status::starting("dns"));
    let report = Report {
        service: "web".into(),
        generation: 0,
        outcome: Outcome::Backends(found),
    };
    assert!(
        !hub.accept(report, &config(vip)),
        "a refused answer changed the state"
    );
    let status = &hub.statuses["web"];
    assert!(!status.healthy && status.backends.is_none());
    status.error.clone().unwrap()
}

#[test]
fn discovered_backends_pass_the_configs_backend_check() {
    // Duplicates count once (the first weight), the order is stable.
    let found = vec![
        (at("10.0.1.2:80"), 1),
        (at("10.0.1.1:80"), 0),
        (at("10.0.1.2:80"), 7),
    ];
    assert_eq!(
        check_backends(&spec("10.0.0.1"), found).unwrap(),
        vec![(at("10.0.1.1:80"), 0), (at("10.0.1.2:80"), 1)]
    );
    assert_eq!(
        refused(
            "10.0.0.1",
            vec![(at("10.0.1.1:80"), 1), (at("[fd00::1]:80"), 1)]
        ),
        "answer refused: backend [fd00::1]:80: not of the VIP's address family (10.0.0.1)"
    );
    assert_eq!(
        refused("fd00::a", vec![(at("[fd00::1]:0"), 1)]),
        "answer refused: backend [fd00::1]:0: needs a non-zero port"
    );
    assert_eq!(
        refused("10.0.0.1", vec![(at("10.0.1.1:80"), MAX_WEIGHT + 1)]),
        "answer refused: backend 10.0.1.1:80: weight 1001 over the maximum 1000"
    );
}
