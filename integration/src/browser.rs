//! Headless Chromium, driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: requests in on fd 3, answers and events out
//! on fd 4, each a JSON text ended by a NUL byte).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// The browser binary, if installed.
pub fn chromium() -> Option<&'static str> {
    ["chromium-headless-shell", "chromium"]
        .into_iter()
        .find(|b| crate::supervisor::have(b))
}

pub struct Browser {
    child: Child,
    to: File,
    from: std::sync::mpsc::Receiver<Value>,
    next: u64,
    session: String,
}

fn pipe() -> anyhow::Result<(RawFd, RawFd)> {
    let mut fds = [0; 2];
    // SAFETY: a two-int array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    Ok((fds[0], fds[1]))
}

impl Browser {
    /// Starts the browser with a blank page, its profile in `profile`,
    /// trusting a server certificate whose key has the SHA-256 SPKI hash
    /// `spki` (base64), and nothing else beyond the system's roots.
    pub fn launch(profile: &Path, spki: Option<&str>) -> anyhow::Result<Browser> {
        let bin = chromium().context("no chromium-headless-shell or chromium installed")?;
        let (to_read, to_write) = pipe()?;
        let (from_read, from_write) = pipe()?;
        let mut cmd = Command::new(bin);
        cmd.args([
            "--headless",
            "--remote-debugging-pipe",
            // As root, Chromium runs only without its sandbox.
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
        ])
        .arg(format!("--user-data-dir={}", profile.display()));
        if let Some(h) = spki {
            cmd.arg(format!("--ignore-certificate-errors-spki-list={h}"));
        }
        cmd.arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(to_read, 3) < 0 || libc::dup2(from_write, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {bin}"))?;
        // SAFETY: fds of our own, each owned once from here.
        let (to, from) = unsafe {
            libc::close(to_read);
            libc::close(from_write);
            (File::from_raw_fd(to_write), File::from_raw_fd(from_read))
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(from);
            loop {
                let mut buf = Vec::new();
                match r.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        buf.pop();
                        if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                            if tx.send(v).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        let mut b = Browser {
            child,
            to,
            from: rx,
            next: 0,
            session: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let target = loop {
            let targets = b.call("Target.getTargets", json!({}), false)?;
            let page = targets["targetInfos"]
                .as_array()
                .and_then(|a| a.iter().find(|t| t["type"] == "page"))
                .and_then(|t| t["targetId"].as_str())
                .map(str::to_string);
            if let Some(p) = page {
                break p;
            }
            if Instant::now() > deadline {
                bail!("the browser opened no page: {targets}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
            false,
        )?;
        b.session = attached["sessionId"].as_str().context("no session id")?.to_string();
        Ok(b)
    }

    /// Sends `method` (to the page's session if `page`) and waits for its
    /// answer, skipping events.
    fn call(&mut self, method: &str, params: Value, page: bool) -> anyhow::Result<Value> {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if page {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(0);
        self.to.write_all(&bytes).context("writing to the browser")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .from
                .recv_timeout(left)
                .with_context(|| format!("{method}: no answer from the browser"))?;
            if v["id"] == json!(id) {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Opens `url` in the page.
    pub fn navigate(&mut self, url: &str) -> anyhow::Result<()> {
        let r = self.call("Page.navigate", json!({"url": url}), true)?;
        if let Some(e) = r.get("errorText") {
            bail!("navigating to {url}: {e}");
        }
        Ok(())
    }

    /// The value of the script `expr` in the page.
    pub fn eval(&mut self, expr: &str) -> anyhow::Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            true,
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{expr}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// A PNG of the page as it is drawn now, `width` by `height` pixels.
    pub fn screenshot(&mut self, path: &Path, width: u32, height: u32) -> anyhow::Result<()> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
            true,
        )?;
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}), true)?;
        let data = r["data"].as_str().context("no image")?;
        let mut child = Command::new("base64")
            .arg("-d")
            .stdin(Stdio::piped())
            .stdout(File::create(path)?)
            .spawn()?;
        child.stdin.take().context("stdin")?.write_all(data.as_bytes())?;
        anyhow::ensure!(child.wait()?.success(), "decoding the screenshot");
        Ok(())
    }

    /// Waits until `expr` is true in the page; the last value if it never is.
    pub fn wait_for(&mut self, expr: &str, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let v = self.eval(expr).unwrap_or(Value::Null);
            if v == Value::Bool(true) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let text = self
                    .eval("document.body ? document.body.innerText : ''")
                    .unwrap_or_default();
                bail!("{expr} did not hold within {within:?}; the page reads:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The base64 SHA-256 of the public key in the PEM certificate `cert`, as
/// `--ignore-certificate-errors-spki-list` takes it.
pub fn spki_hash(cert: &Path) -> anyhow::Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(
            "openssl x509 -in \"$1\" -pubkey -noout | openssl pkey -pubin -outform der \
             | openssl dgst -sha256 -binary | openssl base64 -A",
        )
        .arg("sh")
        .arg(cert)
        .output()
        .context("running openssl")?;
    let h = String::from_utf8(out.stdout)?.trim().to_string();
    if !out.status.success() || h.len() != 44 {
        bail!(
            "hashing the key of {}: {}",
            cert.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(h)
}
