//! Prometheus scrapes in tests: fetching `/metrics` and reading a sample.

use std::process::Command;

use crate::ns_sh;

/// The value of one sample line `name{labels} value` (labels as written).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The body at `url` (empty on a failure), fetched with curl, in `netns`
/// if given.
pub fn curl(url: &str, netns: Option<&str>) -> String {
    let args = ["curl", "-sf", "--max-time", "5", url];
    match netns {
        Some(ns) => ns_sh(ns, &args).unwrap_or_default(),
        None => Command::new(args[0])
            .args(&args[1..])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).to_string())
            .unwrap_or_default(),
    }
}
