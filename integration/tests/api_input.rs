//! Bad input at the API: every refusal names the field, nothing is applied,
//! and the controller survives malformed requests.

use bytes::{Buf, BufMut};
use sdn_integration::cluster::Cluster;
use sdn_integration::ops::*;
use sdn_integration::{bin, privileged};
use sdn_proto::v1 as pb;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Code;

/// Sends raw bytes as a gRPC message body, for malformed-request tests.
#[derive(Default, Clone)]
struct RawCodec;
struct RawEnc;
struct RawDec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEnc;
    type Decoder = RawDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RawDec {
        RawDec
    }
}

impl Encoder for RawEnc {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let v = src.chunk().to_vec();
        src.advance(v.len());
        Ok(Some(v))
    }
}

async fn raw_call(addr: &str, path: &'static str, body: Vec<u8>) -> tonic::Status {
    let ch = sdn_proto::connect(addr).await.unwrap();
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await.unwrap();
    match g
        .unary(
            tonic::Request::new(body),
            http::uri::PathAndQuery::from_static(path),
            RawCodec,
        )
        .await
    {
        Ok(_) => tonic::Status::ok("unexpected success"),
        Err(s) => s,
    }
}

async fn apply_nowait(c: &Cluster, ops: Vec<pb::operation::Op>) -> Result<pb::ApplyResponse, tonic::Status> {
    let mut cl = c.client().await.unwrap();
    cl.apply(pb::ApplyRequest {
        operations: ops.into_iter().map(|o| pb::Operation { op: Some(o) }).collect(),
        actor: "t".into(),
        wait: false,
        wait_timeout_ms: 0,
    })
    .await
    .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_whole_and_named() {
    if !privileged() {
        eprintln!("skipping: needs root");
        return;
    }
    let dir = std::env::temp_dir().join("sdn-api-input");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cluster = Cluster::start(&dir).unwrap();
    let base = apply_nowait(
        &cluster,
        vec![
            tenant("t"),
            vpc("v", "t"),
            subnet("s", "v", "10.0.0.0/24", "fd00::/64"),
            host("h", "192.0.2.1"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(base.revision, 1);

    let cases: Vec<(Vec<pb::operation::Op>, &str)> = vec![
        (
            vec![port("p", "t", "s", "h", "d0", "zz:00:00:00:00:01", "10.0.0.5", "", &[])],
            "operations[0].put_port.mac",
        ),
        (
            vec![port("p", "t", "s", "h", "d0", "02:00:00:00:00:01", "10.0.1.5", "", &[])],
            "operations[0].put_port.ipv4",
        ),
        (
            vec![port(
                "p",
                "t",
                "nope",
                "h",
                "d0",
                "02:00:00:00:00:01",
                "10.0.0.5",
                "",
                &[],
            )],
            "operations[0].put_port.subnet_id",
        ),
        (
            vec![port(
                "p",
                "t",
                "s",
                "h",
                "d0",
                "02:00:00:00:00:01",
                "10.0.0.5",
                "",
                &["nope"],
            )],
            "operations[0].put_port.security_group_ids[0]",
        ),
        (
            vec![subnet("s2", "v", "10.0.0.128/25", "")],
            "operations[0].put_subnet.cidr_v4",
        ),
        (
            vec![subnet("s3", "v", "10.0.0.1/24", "")],
            "operations[0].put_subnet.cidr_v4",
        ),
        (
            vec![subnet("s4", "v", "300.0.0.0/8", "")],
            "operations[0].put_subnet.cidr_v4",
        ),
        (
            vec![group("g", "t", vec![ingress("r", false, "tcp", (90, 80), "", "")])],
            "operations[0].put_security_group.rules[0].port_min",
        ),
        (
            vec![group("g", "t", vec![ingress("r", false, "tcp", (1, 70000), "", "")])],
            "operations[0].put_security_group.rules[0].port_max",
        ),
        (
            vec![group(
                "g",
                "t",
                vec![ingress("r", false, "tcp", (80, 80), "fd00::/8", "")],
            )],
            "operations[0].put_security_group.rules[0].remote_cidr",
        ),
        (
            vec![group("g", "t", vec![ingress("r", false, "tcp", (80, 80), "", "ghost")])],
            "operations[0].put_security_group.rules[0].remote_group_id",
        ),
        // A good operation followed by a bad one: nothing is applied.
        (
            vec![tenant("t2"), vpc("v2", "missing")],
            "operations[1].put_vpc.tenant_id",
        ),
    ];
    for (ops, field) in cases {
        let e = apply_nowait(&cluster, ops).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(
            e.message().starts_with(field),
            "expected the message to name {field}: {}",
            e.message()
        );
        eprintln!("refused: {}", e.message());
    }
    let mut c = cluster.client().await.unwrap();
    let all = c
        .list(pb::ListRequest { kind: 0, stale: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.revision, 1, "no refused batch was applied");
    assert_eq!(all.tenants.len(), 1, "the good half of a refused batch was not applied");

    // An operation with nothing set, an unknown enum value, an empty batch.
    let e = c
        .apply(pb::ApplyRequest {
            operations: vec![pb::Operation { op: None }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "operations[0]: no operation set")
    );
    let e = c.list(pb::ListRequest { kind: 42, stale: false }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c.apply(pb::ApplyRequest::default()).await.unwrap_err();
    assert!(e.message().contains("empty"), "{e:?}");

    // Bytes that are not protobuf at all, and a truncated message.
    let s = raw_call(
        &cluster.addr,
        "/sdn.v1.Provisioning/Apply",
        vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0x01],
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("decode"), "{s:?}");
    eprintln!("garbage body: {:?} {}", s.code(), s.message());
    let good = prost::Message::encode_to_vec(&pb::ApplyRequest {
        operations: vec![pb::Operation { op: Some(tenant("zz")) }],
        ..Default::default()
    });
    let s = raw_call(
        &cluster.addr,
        "/sdn.v1.Provisioning/Apply",
        good[..good.len() - 2].to_vec(),
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    // An agent that names a host that does not exist.
    let mut a = pb::agent_client::AgentClient::new(sdn_proto::connect(&cluster.addr).await.unwrap());
    let e = a
        .register(pb::RegisterRequest {
            host_id: "ghost".into(),
            agent_version: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("host_id"));

    assert!(cluster.controller.alive(), "the controller survived");
    let after = c
        .list(pb::ListRequest { kind: 0, stale: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.revision, 1);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sdnctl_validate_reports_lines() {
    let dir = std::env::temp_dir().join(format!("sdn-sdnctl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.yaml");
    std::fs::write(
        &f,
        "apiVersion: sdn/v1\nkind: SecurityGroup\nmetadata:\n  name: web\n  tenant: t\nspec:\n  rules:\n    - id: a\n      direction: ingress\n      etherType: IPv4\n      protocol: tcpp\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("sdnctl"))
        .args(["validate", "-f"])
        .arg(&f)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bad.yaml:11"), "the error names the line: {err}");
    assert!(err.contains("tcpp"), "{err}");
    let good = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/examples");
    let out = std::process::Command::new(bin("sdnctl"))
        .args(["validate", "-f"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn sdnctl_diff_and_get_round_trip() {
    if !privileged() {
        eprintln!("skipping: needs root");
        return;
    }
    let dir = std::env::temp_dir().join("sdn-sdnctl-diff");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = Cluster::start(&dir).unwrap();
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(bin("sdnctl"))
            .arg("--controller")
            .arg(&cluster.addr)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sdnctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/examples");
    let sg = examples.join("security-groups.yaml");
    let maint = examples.join("security-groups-maintenance.yaml");
    let tenant = dir.join("tenant.yaml");
    std::fs::write(&tenant, "apiVersion: sdn/v1\nkind: Tenant\nmetadata:\n  name: dept-a\n").unwrap();
    ctl(&["apply", "-f", tenant.to_str().unwrap()]);
    let d = ctl(&["diff", "-f", sg.to_str().unwrap()]);
    assert!(
        d.contains("+ SecurityGroup/web") && d.contains("2 to create, 0 to change"),
        "{d}"
    );
    ctl(&["apply", "-f", sg.to_str().unwrap(), "--wait"]);
    let d = ctl(&["diff", "-f", sg.to_str().unwrap()]);
    assert!(d.contains("0 to create, 0 to change, 2 unchanged"), "{d}");
    let d = ctl(&["diff", "-f", maint.to_str().unwrap()]);
    let removed_http = d.lines().any(|l| l.starts_with('-') && l.ends_with("- id: http"));
    assert!(
        d.contains("~ SecurityGroup/web") && removed_http && d.contains("1 to change"),
        "{d}"
    );
    // What get -o yaml prints, apply takes back unchanged.
    let yaml = ctl(&["get", "-o", "yaml"]);
    let f = dir.join("all.yaml");
    std::fs::write(&f, &yaml).unwrap();
    let d = ctl(&["diff", "-f", f.to_str().unwrap()]);
    assert!(d.contains("0 to create, 0 to change, 3 unchanged"), "{d}\n{yaml}");
    let json: serde_json::Value = serde_json::from_str(&ctl(&["get", "security-group", "-o", "json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    let table = ctl(&["get"]);
    assert!(
        table.contains("KIND") && table.contains("security_group  web"),
        "{table}"
    );
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A batch the controller refuses for what it holds (an address another
/// port has) is named at the manifest line and in the manifest's spelling,
/// and nothing of the batch is applied.
#[tokio::test(flavor = "multi_thread")]
async fn sdnctl_names_a_refused_field_at_its_manifest_line() {
    if !privileged() {
        eprintln!("skipping: needs root");
        return;
    }
    let dir = std::env::temp_dir().join("sdn-sdnctl-refused");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = Cluster::start(&dir).unwrap();
    let ctl = |args: &[&str]| {
        std::process::Command::new(bin("sdnctl"))
            .arg("--controller")
            .arg(&cluster.addr)
            .args(args)
            .output()
            .unwrap()
    };
    let base = dir.join("base.yaml");
    std::fs::write(
        &base,
        "\
apiVersion: sdn/v1
kind: Tenant
metadata: {name: t1}
---
apiVersion: sdn/v1
kind: Vpc
metadata: {name: v1, tenant: t1}
---
apiVersion: sdn/v1
kind: Subnet
metadata: {name: s1, tenant: t1}
spec: {vpc: v1, cidrV4: 10.8.0.0/24}
---
apiVersion: sdn/v1
kind: Host
metadata: {name: h1}
spec: {underlayIp: 192.0.2.1}
---
apiVersion: sdn/v1
kind: Port
metadata: {name: p1, tenant: t1}
spec: {subnet: s1, host: h1, device: tap1, mac: \"02:00:00:00:00:01\", ipv4: 10.8.0.5}
",
    )
    .unwrap();
    let out = ctl(&["apply", "-f", base.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A group (fine) and a port whose address p1 has: the second document.
    let more = dir.join("more.yaml");
    std::fs::write(
        &more,
        "\
apiVersion: sdn/v1
kind: SecurityGroup
metadata: {name: web, tenant: t1}
spec: {rules: []}
---
apiVersion: sdn/v1
kind: Port
metadata:
  name: p2
  tenant: t1
spec:
  subnet: s1
  host: h1
  device: tap2
  mac: \"02:00:00:00:00:02\"
  ipv4: 10.8.0.5
",
    )
    .unwrap();
    // Offline, the manifest is valid: only the controller knows p1.
    let out = ctl(&["validate", "-f", more.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = ctl(&["apply", "-f", more.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let want = format!("{}:16: spec.ipv4: ", more.display());
    assert!(err.contains(&want), "expected {want:?} in: {err}");
    assert!(err.contains("nothing in this batch was applied"), "{err}");
    assert!(!err.contains("put_port") && !err.contains("operations["), "{err}");
    // Nothing of the batch is there: not even the group.
    let out = ctl(&["get", "security-group", "-o", "json"]);
    let groups: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(groups.as_array().map(|a| a.len()), Some(0), "{groups}");
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A controller that takes a write and then loses the connection before it
/// answers, as one killed mid-call does: the write may have been committed.
struct LostAnswer {
    got_apply: tokio::sync::mpsc::Sender<()>,
}

#[tonic::async_trait]
impl pb::provisioning_server::Provisioning for LostAnswer {
    async fn apply(
        &self,
        _: tonic::Request<pb::ApplyRequest>,
    ) -> Result<tonic::Response<pb::ApplyResponse>, tonic::Status> {
        let _ = self.got_apply.send(()).await;
        std::future::pending().await
    }
    async fn list(
        &self,
        _: tonic::Request<pb::ListRequest>,
    ) -> Result<tonic::Response<pb::ListResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::ListResponse {
            revision: 41,
            ..Default::default()
        }))
    }
    async fn audit(
        &self,
        _: tonic::Request<pb::AuditRequest>,
    ) -> Result<tonic::Response<pb::AuditResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }
    async fn enforcement(
        &self,
        _: tonic::Request<pb::EnforcementRequest>,
    ) -> Result<tonic::Response<pb::EnforcementResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }
    async fn topology(
        &self,
        _: tonic::Request<pb::TopologyRequest>,
    ) -> Result<tonic::Response<pb::TopologyResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }
    async fn web_login(
        &self,
        _: tonic::Request<pb::WebLoginRequest>,
    ) -> Result<tonic::Response<pb::WebLoginResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }
}

/// When the connection breaks after the write was sent, sdnctl says that
/// the outcome is unknown and how to find out, instead of a bare transport
/// error; a refusal stays a refusal.
#[tokio::test(flavor = "multi_thread")]
async fn sdnctl_says_when_the_outcome_of_a_write_is_unknown() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let fds = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let accepted = fds.clone();
    let incoming = async_stream_of(listener, accepted);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::provisioning_server::ProvisioningServer::new(LostAnswer {
                got_apply: tx,
            }))
            .serve_with_incoming(incoming),
    );
    let dir = std::env::temp_dir().join(format!("sdn-sdnctl-unknown-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tenant = dir.join("tenant.yaml");
    std::fs::write(&tenant, "apiVersion: sdn/v1\nkind: Tenant\nmetadata:\n  name: dept-a\n").unwrap();
    let child = std::process::Command::new(bin("sdnctl"))
        .args(["--controller", &addr, "apply", "-f"])
        .arg(&tenant)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(20), rx.recv())
        .await
        .expect("sdnctl sent the write");
    // The connection goes, the answer with it.
    for fd in fds.lock().unwrap().iter() {
        // SAFETY: shutting down a socket this test accepted and still holds.
        unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
    }
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("the outcome is unknown"), "{err}");
    assert!(err.contains("sdnctl audit --after 41"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Accepted connections, each one's descriptor kept so the test can break it.
fn async_stream_of(
    listener: tokio::net::TcpListener,
    fds: std::sync::Arc<std::sync::Mutex<Vec<i32>>>,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use std::os::fd::AsRawFd;
    futures::stream::unfold((listener, fds), |(l, fds)| async move {
        let r = l.accept().await.map(|(s, _)| {
            fds.lock().unwrap().push(s.as_raw_fd());
            s
        });
        Some((r, (l, fds)))
    })
}
