//! A rule removed is a door closed: every connection it admitted stops, in
//! both directions, and none comes back, however either side keeps sending.

use std::time::Duration;

use sdn_integration::lab::Lab;
use sdn_integration::ops::*;
use sdn_integration::{bin, privileged, wait_for, Proc};

#[tokio::test(flavor = "multi_thread")]
async fn removing_a_rule_cuts_every_flow_it_admitted_for_good() {
    if !privileged() {
        eprintln!("skipping: needs root");
        return;
    }
    let http = |on: bool| {
        let mut r = vec![ingress("ssh", false, "tcp", (22, 22), "", "")];
        if on {
            r.push(ingress("http", false, "tcp", (80, 80), "", ""));
        }
        r
    };
    let lab = Lab::new("ovr", &["h1", "h2"])
        .vpc("v", None)
        .subnet("s", "v", "10.50.0.0/24", "")
        .group("web", http(true))
        .vm("server", "h1", "s", &["web"])
        .vm("client", "h2", "s", &["web"])
        .start()
        .await
        .expect("lab");
    let _echo = lab.topo.serve(&["server"], &[], &["--tcp", "80"]).unwrap();
    let server = lab.topo.vm("server").v4.clone();
    // Ten connections, each exchanging every 50 ms for 6 s: the server
    // echoes, so both sides send all along.
    let ns = lab.topo.vm("client").ns.name.clone();
    let mut holds: Vec<Proc> = (0..10)
        .map(|i| {
            Proc::spawn(
                &format!("hold-{i}"),
                Some(&ns),
                &bin("sdn-probe"),
                &["hold", &server, "80", "--seconds", "6", "--interval-ms", "50"],
                &lab.topo.dir,
            )
            .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    lab.cluster
        .apply(vec![group("web", sdn_integration::lab::TENANT, http(false))])
        .await
        .expect("the rule removed");
    wait_for("the connections to end", Duration::from_secs(30), || {
        holds.iter_mut().all(|h| !h.alive())
    })
    .unwrap();
    let mut survived = Vec::new();
    for (i, h) in holds.iter().enumerate() {
        let log = h.log_text();
        if log.contains("failed=0") {
            survived.push(format!("{i}: {log}"));
        }
    }
    assert!(
        survived.is_empty(),
        "connections survived the removal of the rule that admitted them:\n{}",
        survived.join("\n")
    );
    let revoked = lab.cluster.counter(&lab.topo, "h1", "drops", "policy_revoked");
    assert!(
        revoked >= 10,
        "each connection is cut as revoked on the server's host ({revoked})"
    );
    // And no new one opens.
    assert!(!lab.topo.reach("client", "server", "tcp", 80, false));
}
