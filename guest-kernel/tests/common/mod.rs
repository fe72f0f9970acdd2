//! An in-memory `Host` for running modules through the runner on the host.
#![allow(dead_code)]

use guest_kernel::{Host, Phase};
use std::path::PathBuf;
use vmm_abi::{ConfigFile, FunctionConfig};

#[derive(Default)]
pub struct TestHost {
    pub config: Vec<u8>,
    pub stdin: Vec<u8>,
    pub stdin_pos: usize,
    /// Largest chunk handed out per read_stdin (0 = unlimited).
    pub stdin_chunk: usize,
    pub stdin_reads: usize,
    /// Output handed over through write_output, per fd.
    pub flushed_stdout: Vec<u8>,
    pub flushed_stderr: Vec<u8>,
    pub write_calls: usize,
    pub marks: Vec<Phase>,
    pub clock: u64,
    pub clock_calls: usize,
    pub entropy: Option<[u8; 32]>,
    /// Handed out by the first take_entropy call after stdin was first read, as the
    /// VMM does after restoring a function template (taken at the first stdin read).
    pub entropy_after_stdin: Option<[u8; 32]>,
    pub entropy_calls: usize,
    pub raw: Vec<(u64, [u64; 4])>,
    pub get_function_calls: usize,
    /// `clock_calls` when each phase was marked.
    pub clock_calls_at_mark: Vec<usize>,
    /// Which clocks were read, in order: 'R' realtime, 'M' monotonic.
    pub clock_log: String,
}

impl TestHost {
    pub fn new(args: &[&str], env: &[&str], files: &[(&str, &[u8])], stdin: &[u8]) -> Self {
        let cfg = FunctionConfig {
            args: args.iter().map(|a| a.as_bytes()).collect(),
            env: env.iter().map(|e| e.as_bytes()).collect(),
            files: files
                .iter()
                .map(|(p, d)| ConfigFile {
                    path: p.as_bytes(),
                    data: d,
                })
                .collect(),
        };
        TestHost {
            config: cfg.encode(),
            stdin: stdin.to_vec(),
            clock: 1_000_000,
            ..Default::default()
        }
    }
}

impl Host for TestHost {
    fn now_unix_ns(&mut self) -> u64 {
        self.clock_calls += 1;
        self.clock_log.push('R');
        self.clock += 1000;
        1_700_000_000_000_000_000 + self.clock
    }
    fn monotonic_ns(&mut self) -> u64 {
        self.clock_calls += 1;
        self.clock_log.push('M');
        self.clock += 1000;
        self.clock
    }
    fn take_entropy(&mut self) -> Option<[u8; 32]> {
        self.entropy_calls += 1;
        if self.stdin_reads > 0 && self.entropy_after_stdin.is_some() {
            return self.entropy_after_stdin.take();
        }
        self.entropy.take()
    }
    fn get_function(&mut self) -> Vec<u8> {
        self.get_function_calls += 1;
        self.config.clone()
    }
    fn read_stdin(&mut self, buf: &mut [u8]) -> (usize, bool) {
        self.stdin_reads += 1;
        let rest = &self.stdin[self.stdin_pos..];
        let mut n = rest.len().min(buf.len());
        if self.stdin_chunk > 0 {
            n = n.min(self.stdin_chunk);
        }
        buf[..n].copy_from_slice(&rest[..n]);
        self.stdin_pos += n;
        (n, self.stdin_pos == self.stdin.len())
    }
    fn write_output(&mut self, fd: u32, data: &[u8]) {
        self.write_calls += 1;
        match fd {
            1 => self.flushed_stdout.extend_from_slice(data),
            2 => self.flushed_stderr.extend_from_slice(data),
            _ => panic!("write_output to fd {fd}"),
        }
    }
    fn mark(&mut self, phase: Phase) {
        self.marks.push(phase);
        self.clock_calls_at_mark.push(self.clock_calls);
    }
    fn raw_hostcall(&mut self, op: u64, args: [u64; 4]) -> Option<u64> {
        self.raw.push((op, args));
        Some(op.wrapping_mul(1000).wrapping_add(args[0]))
    }
}

/// A workload fetched by tools/fetch-workloads.sh; panics (fails the test) if missing.
pub fn workload(name: &str) -> Vec<u8> {
    let p = repo_root().join("workloads").join(name);
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!(
            "workload {} is missing ({e}): run tools/fetch-workloads.sh first",
            p.display()
        )
    })
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn example(name: &str) -> Vec<u8> {
    std::fs::read(repo_root().join("examples").join(name)).expect("example file")
}
