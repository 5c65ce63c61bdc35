//! A gRPC client that is not ours: Python's grpcio (Debian's
//! `python3-grpcio`), sending one call's request bytes (encoded here with
//! prost) and reporting the status code and the answer's bytes.

use std::path::Path;
use std::process::Command;

use sdn_proto::tls::Files;

/// Sends one gRPC call with Python's grpcio: the request's bytes in, the
/// status code and the answer (hex) or the error's details out.
const GRPC_PY: &str = r#"
import grpc, json, sys
a = json.loads(sys.argv[1])
if a.get("ca"):
    rd = lambda p: open(p, "rb").read() if p else None
    creds = grpc.ssl_channel_credentials(
        root_certificates=rd(a["ca"]), private_key=rd(a.get("key")), certificate_chain=rd(a.get("cert")))
    ch = grpc.secure_channel(a["target"], creds)
else:
    ch = grpc.insecure_channel(a["target"])
same = lambda b: b
try:
    body = bytes.fromhex(a["body"])
    if a.get("bidi"):
        r = next(ch.stream_stream(a["method"], request_serializer=same, response_deserializer=same)(iter([body]), timeout=5))
    elif a.get("stream"):
        r = next(ch.unary_stream(a["method"], request_serializer=same, response_deserializer=same)(body, timeout=5))
    else:
        r = ch.unary_unary(a["method"], request_serializer=same, response_deserializer=same)(body, timeout=5)
    print(json.dumps({"code": "OK", "text": r.hex()}))
except grpc.RpcError as e:
    print(json.dumps({"code": e.code().name, "text": e.details() or ""}))
"#;

pub struct Py<'a> {
    pub target: String,
    pub ca: Option<&'a Path>,
    pub files: Option<&'a Files>,
}

impl Py<'_> {
    /// `(code, details or answer)` of one call; `stream`: the first
    /// message of a server stream.
    pub fn call(&self, method: &str, body: Vec<u8>, stream: bool) -> (String, String) {
        self.run(serde_json::json!({
            "target": self.target,
            "method": method,
            "body": hex(&body),
            "stream": stream,
        }))
    }

    /// The first answer of a bidirectional stream to one request.
    pub fn call_bidi(&self, method: &str, body: Vec<u8>) -> (String, String) {
        self.run(serde_json::json!({
            "target": self.target,
            "method": method,
            "body": hex(&body),
            "bidi": true,
        }))
    }

    fn run(&self, mut a: serde_json::Value) -> (String, String) {
        if let Some(ca) = self.ca {
            a["ca"] = ca.display().to_string().into();
        }
        if let Some(f) = self.files {
            a["cert"] = f.cert.display().to_string().into();
            a["key"] = f.key.display().to_string().into();
        }
        let out = Command::new("/usr/bin/python3")
            .args(["-c", GRPC_PY, &a.to_string()])
            .output()
            .expect("python3");
        let text = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(text.trim())
            .unwrap_or_else(|_| panic!("python3 said: {text}\n{}", String::from_utf8_lossy(&out.stderr)));
        (
            v["code"].as_str().unwrap_or_default().to_string(),
            v["text"].as_str().unwrap_or_default().to_string(),
        )
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes from hex.
pub fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Opens a TLS connection with Python's `ssl` (OpenSSL), as `files` if
/// given, and reports what it saw: `cert` (the server's certificate, DER
/// in hex), `alpn`, and `error` when the handshake or the first read
/// failed (under TLS 1.3 a refused client certificate shows as an alert
/// on that read).
const TLS_PY: &str = r#"
import json, socket, ssl, sys
a = json.loads(sys.argv[1])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_verify_locations(a["ca"])
if a.get("cert"):
    ctx.load_cert_chain(a["cert"], a["key"])
ctx.set_alpn_protocols(["h2"])
host, port = a["target"].rsplit(":", 1)
out = {}
try:
    with socket.create_connection((host, int(port)), timeout=15) as s:
        with ctx.wrap_socket(s) as t:
            out["cert"] = t.getpeercert(binary_form=True).hex()
            out["alpn"] = t.selected_alpn_protocol()
            t.settimeout(15)
            t.recv(1)
except (ssl.SSLError, OSError) as e:
    out["error"] = str(e)
print(json.dumps(out))
"#;

pub fn tls_probe(target: &str, ca: &Path, files: Option<&Files>) -> serde_json::Value {
    let mut a = serde_json::json!({"target": target, "ca": ca.display().to_string()});
    if let Some(f) = files {
        a["cert"] = f.cert.display().to_string().into();
        a["key"] = f.key.display().to_string().into();
    }
    let out = Command::new("/usr/bin/python3")
        .args(["-c", TLS_PY, &a.to_string()])
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|_| panic!("python3 said: {text}\n{}", String::from_utf8_lossy(&out.stderr)))
}
