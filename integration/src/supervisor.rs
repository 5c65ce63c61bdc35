//! A supervisor's receivers, real ones: pmacct's `nfacctd` collecting
//! IPFIX with the cloud's enterprise elements named, and `rsyslogd`
//! writing every syslog message it parses. Both run in a namespace (or
//! the test's own), write under a directory, and stop on drop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proc::Proc;

/// The deployment's private enterprise number in the tests (the default).
pub const PEN: u32 = 32473;

/// The path of a tool, by name.
pub fn which(tool: &str) -> PathBuf {
    let out = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .ok();
    PathBuf::from(
        out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default(),
    )
}

/// Whether a tool is installed.
pub fn have(tool: &str) -> bool {
    !which(tool).as_os_str().is_empty()
}

/// nfacctd, printing every record it aggregates as JSON, each second.
pub struct Nfacctd {
    _proc: Proc,
    dir: PathBuf,
}

impl Nfacctd {
    /// Listens on 127.0.0.1:`port` in `netns`. Our elements are named
    /// `tenant`, `vpc`, `zone`, `rule`, `verdict`, `vport` (the port) and
    /// IANA's `end_reason`, `fwevent`, `segment`; `primitives_more` adds
    /// lines to the primitives file, `aggregate_more` their names (",a,b").
    pub fn start(
        netns: &str,
        dir: &Path,
        port: u16,
        primitives_more: &str,
        aggregate_more: &str,
    ) -> anyhow::Result<Nfacctd> {
        std::fs::create_dir_all(dir)?;
        let primitives = dir.join("primitives.lst");
        std::fs::write(
            &primitives,
            format!(
                "name=tenant\tfield_type={PEN}:1\tlen=vlen\tsemantics=str\n\
                 name=vpc\tfield_type={PEN}:2\tlen=vlen\tsemantics=str\n\
                 name=zone\tfield_type={PEN}:3\tlen=vlen\tsemantics=str\n\
                 name=rule\tfield_type={PEN}:4\tlen=vlen\tsemantics=str\n\
                 name=verdict\tfield_type={PEN}:5\tlen=1\tsemantics=u_int\n\
                 name=vport\tfield_type={PEN}:6\tlen=vlen\tsemantics=str\n\
                 name=end_reason\tfield_type=136\tlen=1\tsemantics=u_int\n\
                 name=fwevent\tfield_type=233\tlen=1\tsemantics=u_int\n\
                 name=segment\tfield_type=351\tlen=8\tsemantics=u_int\n{primitives_more}"
            ),
        )?;
        let config = dir.join("nfacctd.conf");
        std::fs::write(
            &config,
            format!(
                "daemonize: false\nnfacctd_ip: 127.0.0.1\nnfacctd_port: {port}\n\
                 aggregate_primitives: {}\nplugins: print[p]\n\
                 aggregate[p]: src_host,dst_host,src_port,dst_port,proto,tenant,vpc,zone,rule,verdict,vport,end_reason,fwevent,segment{aggregate_more}\n\
                 print_output[p]: json\nprint_refresh_time[p]: 1\nprint_output_file_append[p]: true\n\
                 print_output_file[p]: {}\n",
                primitives.display(),
                dir.join("records.json").display()
            ),
        )?;
        let p = Proc::spawn(
            "nfacctd",
            Some(netns),
            &which("nfacctd"),
            &["-f", config.to_str().unwrap()],
            dir,
        )?;
        Ok(Nfacctd {
            _proc: p,
            dir: dir.to_path_buf(),
        })
    }

    /// Every record printed so far.
    pub fn rows(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("records.json"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// rsyslogd, writing each message it parses as one line:
/// `host|app|msgid|pri|structured data|text`.
pub struct Rsyslogd {
    _proc: Proc,
    dir: PathBuf,
}

impl Rsyslogd {
    /// `modules`: RainerScript module() (and global()) statements;
    /// `inputs`: input() statements, their ruleset `out`.
    pub fn start(dir: &Path, netns: Option<&str>, modules: &str, inputs: &str) -> anyhow::Result<Rsyslogd> {
        std::fs::create_dir_all(dir)?;
        let d = dir.display();
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                "global(workDirectory=\"{d}\" maxMessageSize=\"16k\")\n{modules}\n\
                 template(name=\"line\" type=\"string\" string=\"%hostname%|%app-name%|%msgid%|%pri%|%structured-data%|%msg%\\n\")\n\
                 ruleset(name=\"out\") {{ action(type=\"omfile\" file=\"{d}/events.log\" template=\"line\") }}\n{inputs}\n"
            ),
        )?;
        let pid = dir.join("rsyslogd.pid");
        let p = Proc::spawn(
            "rsyslogd",
            netns,
            "/usr/sbin/rsyslogd".as_ref(),
            &["-n", "-f", conf.to_str().unwrap(), "-i", pid.to_str().unwrap()],
            dir,
        )?;
        std::thread::sleep(Duration::from_millis(1000));
        Ok(Rsyslogd {
            _proc: p,
            dir: dir.to_path_buf(),
        })
    }

    /// rsyslogd listening on UDP 127.0.0.1:`port`.
    pub fn udp(dir: &Path, netns: Option<&str>, port: u16) -> anyhow::Result<Rsyslogd> {
        Self::start(
            dir,
            netns,
            "module(load=\"imudp\")",
            &format!("input(type=\"imudp\" address=\"127.0.0.1\" port=\"{port}\" ruleset=\"out\")"),
        )
    }

    /// Every message written so far.
    pub fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("events.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// The messages once `done` holds for them; panics after `timeout`
    /// naming `what` and showing what came.
    pub async fn wait_for_lines(&self, what: &str, timeout: Duration, done: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let l = self.lines();
            if done(&l) {
                return l;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "waiting for {what}; rsyslog has:\n{}",
                l.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
