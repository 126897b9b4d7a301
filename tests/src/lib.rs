//! Helpers for the integration tests: find the built binaries, provision credentials, run processes
//! with deadlines, and read safetensors files without libtorch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// A workspace binary next to the test executable's profile directory (target/<profile>/).
/// The test command (`bash deploy/test.sh`) builds them before running the tests.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; `bash deploy/test.sh` does it)",
        path.display()
    );
    path
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Runs a command to completion; panics with its output if it fails.
pub fn run_ok(command: &mut Command) -> Output {
    let output = command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `flotilla-certs --dir <pki> <args>`.
pub fn certs(pki: &Path, args: &[&str]) -> Output {
    run_ok(Command::new(binary("flotilla-certs")).arg("--dir").arg(pki).args(args))
}

/// A CA in `pki`, a coordinator kit for `localhost`, and one kit per device id.
pub fn provision(pki: &Path, devices: &[&str]) {
    certs(pki, &["init"]);
    certs(pki, &["issue", "coordinator", "--name", "localhost"]);
    for id in devices {
        certs(pki, &["issue", "device", "--id", id]);
    }
}

/// A background process whose stdout and stderr go to files; killed if dropped while running.
pub struct Process {
    pub name: String,
    child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Process {
    pub fn spawn(name: &str, command: &mut Command, log_dir: &Path) -> Process {
        std::fs::create_dir_all(log_dir).expect("log dir");
        let stdout = log_dir.join(format!("{name}.out"));
        let stderr = log_dir.join(format!("{name}.log"));
        let child = command
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Process { name: name.to_string(), child, stdout, stderr }
    }

    /// Waits up to `timeout`; on timeout kills the process and panics with its logs.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{} did not finish within {timeout:?}\n{}", self.name, self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the process's stderr contains `needle`; panics with its logs after `timeout`.
    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) {
        self.wait_for_stderr_count(needle, 1, timeout);
    }

    /// Waits until the process's stderr contains `needle` at least `count` times; panics with its
    /// logs after `timeout`.
    pub fn wait_for_stderr_count(&self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.stderr_text().matches(needle).count() < count {
            assert!(
                Instant::now() < deadline,
                "{} logged '{needle}' fewer than {count} times\n{}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id (e.g. to send it a signal with `kill`).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reap the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn logs(&self) -> String {
        format!(
            "--- {} stdout\n{}\n--- {} stderr\n{}",
            self.name,
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            self.name,
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits for a file to appear with content (e.g. the coordinator's address file).
pub fn wait_for_file(path: &Path, timeout: Duration, process: &mut Process) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if !text.trim().is_empty() {
                return text.trim().to_string();
            }
        }
        if let Ok(Some(status)) = process.child.try_wait() {
            panic!("{} exited with {status} before writing {}\n{}", process.name, path.display(), process.logs());
        }
        assert!(Instant::now() < deadline, "{} never appeared\n{}", path.display(), process.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `config` (TOML whose `[server]` has `address_file = "<run>/addr"`) to `<run>/c.toml`,
/// starts `flotilla-coordinator serve` on it (logs in `<run>/logs`) and waits until it listens.
/// Returns the process and its QUIC address.
pub fn start_coordinator(run: &Path, config: &str) -> (Process, String) {
    start_coordinator_with(run, config, &[])
}

/// [`start_coordinator`] with extra `serve` arguments; the address file is always `<run>/addr`.
pub fn start_coordinator_with(run: &Path, config: &str, args: &[&str]) -> (Process, String) {
    let path = run.join("c.toml");
    std::fs::write(&path, config).expect("config file");
    let mut coordinator = Process::spawn(
        "coordinator",
        Command::new(binary("flotilla-coordinator"))
            .args(["serve", "--config"])
            .arg(&path)
            .arg("--address-file")
            .arg(run.join("addr"))
            .args(args),
        &run.join("logs"),
    );
    let address = wait_for_file(&run.join("addr"), Duration::from_secs(30), &mut coordinator);
    (coordinator, address)
}

/// `flotilla-edge run` against `address` with the kit in `kit`, at `rank`, on `samples` synthetic
/// samples; callers add their own flags and environment.
pub fn edge_run(address: &str, kit: &Path, rank: impl std::fmt::Display, samples: impl std::fmt::Display) -> Command {
    let mut command = Command::new(binary("flotilla-edge"));
    command.args(["run", "--coordinator", address, "--rank", &rank.to_string(), "--samples", &samples.to_string()]);
    command.arg("--kit").arg(kit);
    command
}

/// `flotilla-coordinator check` on `config` (written to `<run>/c.toml`): whether it passed, and
/// what it printed.
pub fn check_config(run: &Path, config: &str) -> (bool, String) {
    let path = run.join("c.toml");
    std::fs::write(&path, config).expect("config file");
    let output = Command::new(binary("flotilla-coordinator"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("flotilla-coordinator runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr),
    )
}

/// `flotilla-edge sim` with `clients` devices of the profile `mix`, their kits in `<pki>/kits`,
/// two training at a time on 64 samples each, against `address`; logs in `<run>/logs`.
pub fn start_sim(run: &Path, pki: &Path, address: &str, clients: usize, mix: &str) -> Process {
    Process::spawn(
        "sim",
        Command::new(binary("flotilla-edge"))
            .args(["sim", "--coordinator", address, "--clients", &clients.to_string()])
            .args(["--concurrency", "2", "--samples", "64", "--profile-mix", mix, "--kits"])
            .arg(pki.join("kits")),
        &run.join("logs"),
    )
}

/// A 2-D f32 matrix read from a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f64>,
}

impl Matrix {
    pub fn at(&self, r: usize, c: usize) -> f64 {
        self.values[r * self.cols + c]
    }
}

/// Every tensor of a safetensors file (f32 only) as a row-major matrix (1-D tensors as 1 × n),
/// and the file's metadata.
pub fn read_safetensors(path: &Path) -> (HashMap<String, Matrix>, HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("metadata");
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name} in {}", path.display());
        let values: Vec<f64> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect();
        let (rows, cols) = match view.shape() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            other => panic!("{name}: unexpected shape {other:?}"),
        };
        out.insert(name, Matrix { rows, cols, values });
    }
    (out, meta.metadata().clone().unwrap_or_default())
}

/// Writes a PEFT adapter directory: `tensors` as (name, rows, cols, row-major values) in f32,
/// `num_samples` in the safetensors metadata when given, and an adapter_config.json.
pub fn write_peft_adapter(
    dir: &Path,
    tensors: &[(String, usize, usize, Vec<f32>)],
    r: usize,
    lora_alpha: f64,
    num_samples: Option<u64>,
) {
    std::fs::create_dir_all(dir).unwrap();
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, rows, cols, _), b)| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*rows, *cols], b).unwrap(),
            )
        })
        .collect();
    let metadata = num_samples.map(|n| HashMap::from([("num_samples".to_string(), n.to_string())]));
    std::fs::write(dir.join("adapter_model.safetensors"), safetensors::serialize(views, metadata).unwrap()).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "target_modules": ["layer"],
        "lora_dropout": 0.0, "bias": "none", "task_type": null
    });
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

pub mod impair;
pub mod wire;

/// A UDP port free right now on 127.0.0.1 (for a coordinator that must keep its port across restarts).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port()
}

/// A TCP port free right now on 127.0.0.1 (for a metrics endpoint).
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port()
}

/// One plain-HTTP GET on 127.0.0.1, the whole response (status line, headers, body); `None` if
/// nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// The value of the first Prometheus sample whose line starts with `line_start`
/// (e.g. `"fl_clients_connected "` or `"fl_phase{phase=\"training\"}"`).
pub fn metric_value(body: &str, line_start: &str) -> Option<f64> {
    body.lines().find(|l| l.starts_with(line_start))?.rsplit(' ').next()?.parse().ok()
}

/// A `/proc/<pid>/status` memory figure in KiB, e.g. `VmRSS` or `VmHWM` (peak).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
