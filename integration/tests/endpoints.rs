//! The standard endpoints: gRPC health checking and server reflection
//! (asked with Python's grpcio), and the Prometheus metrics of the
//! controller and the agent (read with curl, checked with promtool).

use std::process::Command;

use sdn_integration::cluster::Cluster;
use sdn_integration::lab::Lab;
use sdn_integration::ops::*;
use sdn_integration::pyclient::{unhex, Py};
use sdn_integration::scrape::{curl, sample};
use sdn_integration::{bin, free_port, privileged, wait_for};
use sdn_proto::v1 as pb;

/// `grpc.health.v1.HealthCheckRequest{service}`.
fn health_request(service: &str) -> Vec<u8> {
    let mut b = Vec::new();
    if !service.is_empty() {
        b.push(0x0a);
        b.push(service.len() as u8);
        b.extend_from_slice(service.as_bytes());
    }
    b
}

/// Checks a scrape with promtool (exit 0, no problems of format).
fn promtool(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool's lint asks for `_total` on counters' names in the text
    // form, which OpenMetrics gives; only errors of format fail here.
    assert!(
        out.status.success() || !said.contains("error"),
        "promtool: {said}\n{text}"
    );
}

#[test]
fn health_and_reflection_answer_a_client_that_is_not_ours() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start_secure(dir.path()).unwrap();
    let pki = c.pki.as_ref().unwrap();
    let files = pki.files("sdn://supervisor/monitor").unwrap();
    let py = Py {
        target: c.addr.trim_start_matches("https://").to_string(),
        ca: Some(&pki.ca()),
        files: Some(&files),
    };
    let check = "/grpc.health.v1.Health/Check";
    for service in [
        "",
        "sdn.v1.Provisioning",
        "sdn.v1.Agent",
        "sdn.v1.Raft",
        "sdn.v1.Cluster",
    ] {
        let (code, text) = py.call(check, health_request(service), false);
        assert_eq!((code.as_str(), text.as_str()), ("OK", "0801"), "{service:?}: SERVING");
    }
    let (code, _) = py.call(check, health_request("sdn.v1.Nothing"), false);
    assert_eq!(code, "NOT_FOUND");
    // Reflection: list the services (`list_services`, field 7).
    let (code, text) = py.call_bidi(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        vec![0x3a, 0x00],
    );
    assert_eq!(code, "OK", "{text}");
    let answer = String::from_utf8_lossy(&unhex(&text)).to_string();
    for s in [
        "sdn.v1.Provisioning",
        "sdn.v1.Agent",
        "sdn.v1.Raft",
        "sdn.v1.Cluster",
        "grpc.health.v1.Health",
    ] {
        assert!(answer.contains(s), "{s} listed: {answer:?}");
    }
    // Without a certificate, nothing: not even health.
    let (code, _) = Py {
        target: py.target.clone(),
        ca: Some(&pki.ca()),
        files: None,
    }
    .call(check, health_request(""), false);
    assert_eq!(code, "UNAVAILABLE");
}

#[tokio::test]
async fn controller_metrics_follow_writes_refusals_and_hosts() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let c = Cluster::start_secure_with(dir.path(), &["--metrics-listen", &listen]).unwrap();
    let url = format!("http://{listen}/metrics");
    let r = c
        .apply(vec![
            host("h1", "192.0.2.1"),
            tenant("t"),
            vpc("v", "t"),
            subnet("s", "v", "10.1.0.0/24", ""),
        ])
        .await
        .unwrap();
    // A write that concerns h1, whose agent does not run: h1 lags, and a
    // writer that waits for it is told so in time.
    let waited = c
        .client()
        .await
        .unwrap()
        .apply(pb::ApplyRequest {
            operations: vec![pb::Operation {
                op: Some(port(
                    "p1",
                    "t",
                    "s",
                    "h1",
                    "tap1",
                    "02:00:00:00:00:01",
                    "10.1.0.5",
                    "",
                    &[],
                )),
            }],
            actor: String::new(),
            wait: true,
            wait_timeout_ms: 500,
        })
        .await
        .unwrap_err();
    assert_eq!(
        waited.code(),
        tonic::Code::DeadlineExceeded,
        "no agent enforces it: {waited:?}"
    );
    let denied = c.apply_as("sdn://supervisor/x", vec![tenant("u")]).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let text = curl(&url, None);
    promtool(&text);
    let revision = sample(&text, "sdn_revision").expect("sdn_revision");
    assert!(revision >= r.revision as f64 + 1.0, "{text}");
    assert_eq!(sample(&text, "sdn_raft_leader"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "sdn_raft_state{state=\"leader\"}"), Some(1.0), "{text}");
    assert!(sample(&text, "sdn_raft_term").unwrap_or(0.0) >= 1.0, "{text}");
    assert_eq!(
        sample(&text, "sdn_apply_total{outcome=\"applied\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "sdn_apply_total{outcome=\"unenforced\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "sdn_apply_total{outcome=\"denied\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, "sdn_apply_duration_seconds_count").unwrap_or(0.0) >= 3.0,
        "{text}"
    );
    assert!(
        sample(&text, "sdn_host_ack_lag{host=\"h1\"}").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert_eq!(sample(&text, "sdn_host_connected{host=\"h1\"}"), Some(0.0), "{text}");
}

#[tokio::test]
async fn agent_metrics_count_drops_flows_and_traffic_per_port() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let lab = Lab::new("mtr", &["h1"])
        .vpc("v", None)
        .subnet("s", "v", "10.77.0.0/24", "")
        .group("open", open_rules())
        .vm("a", "h1", "s", &["open"])
        .vm("b", "h1", "s", &["open"])
        .agent_binary(bin("sdn-agent"), &["--metrics-listen", "127.0.0.1:9464"])
        .start()
        .await
        .expect("lab");
    let ns = lab.topo.host_ns("h1").name.clone();
    let url = "http://127.0.0.1:9464/metrics";
    // Traffic between a and b, and a forged source from a.
    assert!(lab.topo.reach("a", "b", "icmp", 0, false));
    let a = &lab.topo.vm("a").ns;
    a.sh(&["ip", "addr", "add", "10.77.0.99/32", "dev", "eth0"]).unwrap();
    let b_addr = lab.topo.vm("b").v4.clone();
    let _ = a.sh(&["ping", "-c", "2", "-W", "1", "-I", "10.77.0.99", &b_addr]);
    // The flow table is collected every 5 s.
    let dev = lab.topo.vm("a").device.clone();
    let series = format!("sdn_agent_port_packets_total{{device=\"{dev}\",direction=\"out\"}}");
    let mut text = String::new();
    wait_for(
        "the port's traffic in the metrics",
        std::time::Duration::from_secs(15),
        || {
            text = curl(url, Some(&ns));
            sample(&text, &series).unwrap_or(0.0) >= 1.0
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{text}"));
    promtool(&text);
    assert!(
        sample(&text, "sdn_agent_drops_total{reason=\"spoof_ip\"}").unwrap_or(0.0) >= 2.0,
        "{text}"
    );
    assert!(
        sample(&text, "sdn_agent_packets_total{stat=\"passed\"}").unwrap_or(0.0) >= 2.0,
        "{text}"
    );
    let bytes = format!("sdn_agent_port_bytes_total{{device=\"{dev}\",direction=\"out\"}}");
    assert!(sample(&text, &bytes).unwrap_or(0.0) >= 84.0, "{text}");
    assert!(
        sample(&text, "sdn_agent_enforced_revision").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert!(text.contains("sdn_agent_drops_total{reason=\"ct_budget\"}"), "{text}");
}
