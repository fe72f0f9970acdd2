//! A real Garage cluster for the remote-store tests: 1 or 3 nodes on free loopback ports,
//! data in a temp directory, configured through Garage's own CLI (layout, key, bucket);
//! every node is killed when the cluster is dropped.
//!
//! The binary is `$VMM_GARAGE`, else `~/.cache/vmm-tools/garage-2.5.0/bin/garage`
//! (`tools/install-garage.sh` builds it there). Without it a test skips with a reason,
//! or fails under `VMM_REQUIRE_KVM=1` (CI).
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn garage_binary() -> Option<PathBuf> {
    let p = std::env::var_os("VMM_GARAGE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/vmm-tools/garage-2.5.0/bin/garage"))
        });
    match p.filter(|p| p.is_file()) {
        Some(p) => Some(p),
        None => {
            if std::env::var("VMM_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("VMM_REQUIRE_KVM=1 but the garage binary is missing: run tools/install-garage.sh (or set $VMM_GARAGE)");
            }
            eprintln!(
                "SKIPPED: no garage binary (run tools/install-garage.sh, or set $VMM_GARAGE)"
            );
            None
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .expect("random bytes");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub struct Node {
    pub child: Option<Child>,
    pub cfg: PathBuf,
    pub s3_port: u16,
    pub rpc_port: u16,
    pub admin_port: u16,
    pub id: String,
}

pub struct Garage {
    bin: PathBuf,
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

impl Garage {
    /// Starts `n` nodes (replication factor `n`), assigns them all in zone dc1, creates
    /// bucket `vmm-templates` and a key with read/write on it. None: no binary (skip).
    pub fn start(n: usize, tag: &str) -> Option<Garage> {
        let bin = garage_binary()?;
        let dir = std::env::temp_dir().join(format!("vmm-garage-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let secret = random_hex(32);
        let mut g = Garage {
            bin,
            dir: dir.clone(),
            nodes: Vec::new(),
            bucket: "vmm-templates".into(),
            key_id: String::new(),
            secret: String::new(),
        };
        for i in 0..n {
            let nd = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&nd).unwrap();
            let (s3, rpc, admin) = (free_port(), free_port(), free_port());
            let cfg = nd.join("garage.toml");
            std::fs::write(
                &cfg,
                format!(
                    r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = {n}
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{token}"
"#,
                    d = nd.display(),
                    token = random_hex(16),
                ),
            )
            .unwrap();
            let log = std::fs::File::create(nd.join("log")).unwrap();
            let child = Command::new(&g.bin)
                .args(["-c", &cfg.to_string_lossy(), "server"])
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start garage");
            g.nodes.push(Node {
                child: Some(child),
                cfg,
                s3_port: s3,
                rpc_port: rpc,
                admin_port: admin,
                id: String::new(),
            });
        }
        for i in 0..n {
            let out = g.cli_retry(i, &["node", "id", "-q"]);
            g.nodes[i].id = out.trim().to_string();
        }
        for i in 1..n {
            let id = g.nodes[i].id.clone();
            g.cli_retry(0, &["node", "connect", &id]);
        }
        for i in 0..n {
            let short = g.nodes[i].id.split('@').next().unwrap().to_string();
            g.cli_retry(0, &["layout", "assign", "-z", "dc1", "-c", "1G", &short]);
        }
        g.cli_retry(0, &["layout", "apply", "--version", "1"]);
        let b = g.bucket.clone();
        g.cli_retry(0, &["bucket", "create", &b]);
        g.cli_retry(0, &["key", "create", "vmm-test"]);
        g.cli_retry(
            0,
            &[
                "bucket", "allow", "--read", "--write", "--owner", &b, "--key", "vmm-test",
            ],
        );
        let info = g.cli_retry(0, &["key", "info", "vmm-test", "--show-secret"]);
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("no {name} in garage key info: {info}"))
        };
        g.key_id = field("Key ID:");
        g.secret = field("Secret key:");
        Some(g)
    }

    /// Runs the garage CLI against node `i`, retrying for up to 60 s while the cluster settles.
    pub fn cli_retry(&self, i: usize, args: &[&str]) -> String {
        let t0 = Instant::now();
        loop {
            let out = Command::new(&self.bin)
                .args(["-c", &self.nodes[i].cfg.to_string_lossy()])
                .args(args)
                .output()
                .expect("run garage");
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            if t0.elapsed() > Duration::from_secs(60) {
                panic!(
                    "garage {args:?} failed: {}{}\nlog: {}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    std::fs::read_to_string(self.dir.join(format!("node{i}/log")))
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.nodes[0].s3_port)
    }

    /// The environment a client of this cluster needs (remote `s3://vmm-templates/PREFIX`).
    pub fn env(&self, cmd: &mut Command, prefix: &str) {
        cmd.env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env("AWS_REGION", "garage")
            .env("VMM_REMOTE", format!("s3://{}/{prefix}", self.bucket))
            .env("VMM_REMOTE_ENDPOINT", self.endpoint());
    }

    /// Garage's own count of the bucket: (bytes, objects), from `garage bucket info`.
    pub fn bucket_info(&self) -> (u64, u64) {
        let info = self.cli_retry(0, &["bucket", "info", &self.bucket]);
        let line = |name: &str| {
            info.lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("no {name} in garage bucket info: {info}"))
        };
        (
            parse_size(&line("Size:")),
            line("Objects:").parse().unwrap(),
        )
    }

    /// A counter from node `i`'s Prometheus metrics (its admin API), e.g. `block_bytes_read`.
    pub fn metric(&self, i: usize, name: &str) -> f64 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.nodes[i].admin_port))
            .expect("connect to garage admin API");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                (k == name || k.starts_with(&format!("{name}{{"))).then(|| v.parse::<f64>().ok())?
            })
            .sum()
    }

    /// Kills node `i` (SIGKILL) and waits for it.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.nodes[i]
            .cfg
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf()
    }
}

/// `12.3 MiB (12.9 MB)` or `0 B (0 B)` -> bytes (the first figure; binary units).
fn parse_size(s: &str) -> u64 {
    let first = s.split('(').next().unwrap().trim();
    let (num, unit) = first.split_once(' ').unwrap_or((first, "B"));
    let v: f64 = num.parse().unwrap_or_else(|_| panic!("size {s:?}"));
    let mult = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => panic!("unit in {s:?}"),
    };
    (v * mult) as u64
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
