//! `vmm serve` for the end-to-end tests: a real daemon on a free loopback port, its log
//! collected, and a real HTTP client (ureq).

use super::{vmm, TempDir};
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `vmm serve` on a free loopback port; killed on drop.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    pub log: Arc<Mutex<String>>,
}

impl Daemon {
    pub fn start(store: &TempDir, extra: &[&str]) -> Daemon {
        let child = vmm()
            .args(["serve", "--listen", "127.0.0.1:0", "--store", &store.arg()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm serve");
        Daemon::spawned(child)
    }

    /// A `vmm serve` spawned by the caller (with its stderr piped): wait for its address.
    pub fn spawned(mut child: Child) -> Daemon {
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("vmm serve: listening on ") {
                    let _ = tx.send(a.to_string());
                }
                l.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("vmm serve did not start: {}", log.lock().unwrap()));
        Daemon { child, addr, log }
    }

    pub fn url(&self, p: &str) -> String {
        format!("http://{}{p}", self.addr)
    }

    pub fn invoke(&self, name: &str, body: &[u8]) -> (u16, String, Option<String>) {
        let r = ureq::post(&self.url(&format!("/v1/functions/{name}/invoke")))
            .timeout(Duration::from_secs(60))
            .send_bytes(body);
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("POST {name}: {e}; daemon log:\n{}", self.log()),
        };
        let status = resp.status();
        let code = resp.header("x-vmm-exit-code").map(str::to_string);
        let body = resp.into_string().unwrap_or_default();
        (status, body, code)
    }

    pub fn get(&self, p: &str) -> (u16, String) {
        match ureq::get(&self.url(p)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
            Err(e) => panic!("GET {p}: {e}"),
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Wait (up to 60 s) until the pool keeper has loaded `templates` templates and filled
    /// each pool with `ready` instances (it fills them after the daemon starts listening).
    pub fn wait_pools(&self, templates: usize, ready: u64) {
        let t0 = Instant::now();
        loop {
            let v: serde_json::Value = serde_json::from_str(&self.get("/v1/functions").1).unwrap();
            let f = v["functions"].as_array().unwrap();
            if f.len() == templates && f.iter().all(|f| f["ready"].as_u64() == Some(ready)) {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "pools not filled: {v}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the daemon's log comes to contain `what` within 20 s (its stderr is read on
    /// another thread, so a line can arrive after the response it describes).
    pub fn logged(&self, what: &str) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if self.log().contains(what) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: sends SIGTERM to our own child process, which is still running or a
        // zombie (not yet waited for), so the pid cannot have been reused.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "vmm serve did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
