//! The edge client as a device owner installs it (deploy/package-edge.sh, built by the test
//! command before the tests): the x86-64 CPU archive unpacked into an empty directory runs with no
//! Rust, no Python and no LD_LIBRARY_PATH, stays within its size budget, and its fleet joins the
//! quickstart's coordinator; a damaged archive says which library is wrong; the Debian package
//! carries the same tree, the unit and the kit's place.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use std::time::Duration;

use flotilla_tests::{binary, provision, run_ok, start_coordinator, workspace_root};

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The budget for the CPU edge install: runtime and client, on disk.
const CPU_INSTALL_BUDGET_BYTES: u64 = 700_000_000;

/// The built artefact, or `None` (the test then says why it did nothing) unless the test command
/// asked for it with FLOTILLA_REQUIRE_EDGE_PACKAGE.
fn artefact(name: &str) -> Option<PathBuf> {
    let path = workspace_root().join("dist").join(name);
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("FLOTILLA_REQUIRE_EDGE_PACKAGE").is_none(),
        "{} is missing: run `bash deploy/package-edge.sh x86_64-cpu`",
        path.display()
    );
    eprintln!("skipped: {} is not built (bash deploy/package-edge.sh x86_64-cpu)", path.display());
    None
}

fn unpack(archive: &Path, into: &Path) -> PathBuf {
    std::fs::create_dir_all(into).unwrap();
    run_ok(Command::new("tar").arg("-xzf").arg(archive).arg("-C").arg(into));
    into.join(format!("flotilla-edge-{VERSION}-x86_64-cpu"))
}

/// A PATH with only what the launcher uses: no cargo, no rustc, no python.
fn bare_path(dir: &Path) -> PathBuf {
    let bin = dir.join("bare-bin");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["readlink", "od", "tr", "uname"] {
        let found = ["/usr/bin", "/bin"].iter().map(|d| Path::new(d).join(tool)).find(|p| p.exists());
        symlink(found.unwrap_or_else(|| panic!("{tool} not found")), bin.join(tool)).unwrap();
    }
    bin
}

/// Runs `launcher args` in a cleared environment (HOME and the bare PATH only).
fn run_installed(launcher: &Path, path: &Path, home: &Path, args: &[&str]) -> Output {
    Command::new(launcher).env_clear().env("HOME", home).env("PATH", path).args(args).output().unwrap()
}

fn size_on_disk(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() { size_on_disk(&entry.path()) } else { meta.len() };
    }
    total
}

fn needed_libraries(elf: &Path) -> Option<Vec<String>> {
    let output = Command::new("readelf").arg("-d").arg(elf).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    Some(
        text.lines()
            .filter(|l| l.contains("(NEEDED)"))
            .filter_map(|l| Some(l.split('[').nth(1)?.trim_end_matches(']').to_string()))
            .collect(),
    )
}

#[test]
fn the_cpu_archive_runs_without_rust_or_python_and_its_fleet_joins_the_quickstart() {
    let Some(archive) = artefact(&format!("flotilla-edge-{VERSION}-x86_64-cpu.tar.gz")) else { return };
    let dir = tempfile::tempdir().unwrap();
    let home = unpack(&archive, &dir.path().join("install"));
    let launcher = home.join("bin/flotilla-edge");

    let size = size_on_disk(&home);
    assert!(size <= CPU_INSTALL_BUDGET_BYTES, "the CPU install is {size} bytes");
    let manifest = std::fs::read_to_string(home.join("lib/MANIFEST")).unwrap();
    assert!(manifest.contains("libtorch_cpu.so") && !manifest.contains("libtorch_cuda"), "{manifest}");
    if let Some(needed) = needed_libraries(&home.join("libexec/flotilla-edge")) {
        assert!(needed.contains(&"libtorch_cpu.so".to_string()), "{needed:?}");
        assert!(!needed.iter().any(|l| l.contains("cuda") || l == "libtorch.so"), "{needed:?}");
    }

    let path = bare_path(dir.path());
    let probe = run_installed(&launcher, &path, dir.path(), &["probe", "--format", "json"]);
    assert!(probe.status.success(), "{}", String::from_utf8_lossy(&probe.stderr));
    let report: serde_json::Value = serde_json::from_slice(&probe.stdout).unwrap();
    assert_eq!(report["cuda_available"], false, "{report}");
    assert!(report["choice"]["rank"].as_u64().is_some(), "{report}");

    // The README's main command with the fleet run from the archive.
    let run_dir = dir.path().join("run");
    let output = run_ok(
        Command::new("bash")
            .arg(workspace_root().join("deploy/quickstart.sh"))
            .env("FLOTILLA_BIN_DIR", binary("flotilla-coordinator").parent().unwrap())
            .env("FLOTILLA_RUN_DIR", &run_dir)
            .env("FLOTILLA_EDGE", &launcher)
            .env("FLOTILLA_EDGE_PATH", &path)
            .env("FLOTILLA_ROUNDS", "1")
            .env("FLOTILLA_LOCAL_STEPS", "4")
            .env("FLOTILLA_EVAL_SAMPLES", "20"),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("[round 1/1] aggregated 4 updates"), "{stdout}");
    assert!(stdout.contains("run finished: 1 round(s)"), "{stdout}");
    let device_log = std::fs::read_to_string(run_dir.join("logs/phone-1.log")).unwrap();
    assert!(device_log.contains("cuda_build=false"), "the archive's client has no CUDA: {device_log}");
}

/// A copy of the install whose files are hard links (cheap), with `lib/<damaged>` replaced by what
/// `damage` makes of it.
fn damaged_copy(home: &Path, into: &Path, damaged: &str, damage: impl Fn(&Path)) -> PathBuf {
    for sub in ["bin", "libexec", "lib"] {
        std::fs::create_dir_all(into.join(sub)).unwrap();
        for entry in std::fs::read_dir(home.join(sub)).unwrap() {
            let entry = entry.unwrap();
            let target = into.join(sub).join(entry.file_name());
            if entry.file_name() == damaged {
                std::fs::copy(entry.path(), &target).unwrap();
            } else {
                std::fs::hard_link(entry.path(), &target).unwrap();
            }
        }
    }
    damage(&into.join("lib").join(damaged));
    into.join("bin/flotilla-edge")
}

#[test]
fn a_damaged_archive_names_the_library_and_the_fix() {
    let Some(archive) = artefact(&format!("flotilla-edge-{VERSION}-x86_64-cpu.tar.gz")) else { return };
    let dir = tempfile::tempdir().unwrap();
    let home = unpack(&archive, &dir.path().join("install"));
    let path = bare_path(dir.path());

    let missing =
        damaged_copy(&home, &dir.path().join("missing"), "libc10.so", |lib| std::fs::remove_file(lib).unwrap());
    let output = run_installed(&missing, &path, dir.path(), &["probe"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(127), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("lib/libc10.so is missing") && stderr.contains("reinstall"), "{stderr}");

    // An aarch64 library (its ELF header says so) in the x86-64 archive.
    let foreign = damaged_copy(&home, &dir.path().join("foreign"), "libgomp.so.1", |lib| {
        let mut bytes = std::fs::read(lib).unwrap();
        bytes[18..20].copy_from_slice(&183u16.to_le_bytes());
        std::fs::write(lib, bytes).unwrap();
    });
    let output = run_installed(&foreign, &path, dir.path(), &["probe"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(127), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("libgomp.so.1 is built for aarch64, the client for x86_64"), "{stderr}");
}

#[test]
fn the_debian_package_holds_the_client_its_unit_and_the_kits_place() {
    let Some(deb) = artefact(&format!("flotilla-edge_{VERSION}_amd64.deb")) else { return };
    let info = String::from_utf8_lossy(&run_ok(Command::new("dpkg-deb").arg("--info").arg(&deb)).stdout).to_string();
    for needle in ["Package: flotilla-edge", "Architecture: amd64", "postinst", "prerm", "postrm"] {
        assert!(info.contains(needle), "{needle}\n{info}");
    }
    let contents =
        String::from_utf8_lossy(&run_ok(Command::new("dpkg-deb").arg("--contents").arg(&deb)).stdout).to_string();
    for needle in [
        "./opt/flotilla-edge/bin/flotilla-edge",
        "./opt/flotilla-edge/libexec/flotilla-edge",
        "./opt/flotilla-edge/lib/libtorch_cpu.so",
        "./lib/systemd/system/flotilla-edge.service",
        "./usr/bin/flotilla-edge -> /opt/flotilla-edge/bin/flotilla-edge",
        "./etc/flotilla/kit/",
    ] {
        assert!(contents.contains(needle), "{needle}\n{contents}");
    }

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    run_ok(Command::new("dpkg-deb").arg("--extract").arg(&deb).arg(&root));
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/flotilla-edge.service")).unwrap();
    assert!(unit.contains("ExecStart=/opt/flotilla-edge/bin/flotilla-edge run"), "{unit}");
    assert!(unit.contains("EnvironmentFile=/etc/flotilla/kit/edge.env"), "{unit}");
    assert!(!unit.contains("Environment=LD_LIBRARY_PATH"), "{unit}");
    let control = dir.path().join("control");
    run_ok(Command::new("dpkg-deb").arg("--control").arg(&deb).arg(&control));
    for script in ["postinst", "prerm", "postrm"] {
        run_ok(Command::new("sh").arg("-n").arg(control.join(script)));
    }
    // The packaged client joins a coordinator: one round of the small MLP.
    let pki = dir.path().join("pki");
    provision(&pki, &["deb-1"]);
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{pki}/kits/coordinator\"\n\
         [round]\nrounds = 1\nmin_devices = 1\nlocal_steps = 5\nbatch_size = 16\n\
         [aggregation]\nmethod = \"fold-and-fill\"\nmax_rank = 4\n\
         [model.architecture.mlp]\ninput = 16\nhidden = [8]\nclasses = 3\n",
        run = run.display(),
        pki = pki.display()
    );
    let (mut coordinator, address) = start_coordinator(&run, &config);
    let kit = pki.join("kits/deb-1");
    let kit = kit.to_str().unwrap();
    let device = run_installed(
        &root.join("opt/flotilla-edge/bin/flotilla-edge"),
        &bare_path(dir.path()),
        dir.path(),
        &[
            "run",
            "--coordinator",
            &address,
            "--server-name",
            "localhost",
            "--kit",
            kit,
            "--rank",
            "2",
            "--samples",
            "64",
        ],
    );
    assert!(device.status.success(), "{}", String::from_utf8_lossy(&device.stderr));
    assert!(coordinator.wait(Duration::from_secs(60)).success(), "{}", coordinator.logs());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["rounds"][0]["updates"][0]["device"], "deb-1", "{summary}");
}

/// deploy/cross/aarch64-smoke.sh, where its parts are here: the cross-built aarch64 archive
/// (`bash deploy/package-edge.sh aarch64`, too long a build for the suite), qemu-user and the
/// aarch64 C++ runtime. The script's last run is in docs/edge.md.
#[test]
fn the_aarch64_archive_completes_a_round_under_qemu_where_it_is_built() {
    let archive = workspace_root().join(format!("dist/flotilla-edge-{VERSION}-aarch64.tar.gz"));
    let qemu = Command::new("qemu-aarch64").arg("--version").output().is_ok_and(|o| o.status.success());
    let sysroot = Path::new("/usr/aarch64-linux-gnu/lib/libstdc++.so.6").exists();
    if !(archive.exists() && qemu && sysroot) {
        eprintln!(
            "skipped: needs {} (bash deploy/package-edge.sh aarch64), qemu-user and libstdc++6-arm64-cross",
            archive.display()
        );
        return;
    }
    // An archive built before the wire protocol last changed speaks an older protocol than this
    // build's coordinator: it is not the code under test.
    let built = std::fs::metadata(&archive).and_then(|m| m.modified()).unwrap();
    let wire_changed = std::fs::read_dir(workspace_root().join("common/wire/src"))
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.metadata().and_then(|m| m.modified()).ok())
        .max()
        .unwrap();
    if wire_changed > built {
        eprintln!("skipped: {} predates the last change to common/wire/src; rebuild it", archive.display());
        return;
    }
    let output = run_ok(
        Command::new("bash")
            .arg(workspace_root().join("deploy/cross/aarch64-smoke.sh"))
            .env("FLOTILLA_BIN_DIR", binary("flotilla-coordinator").parent().unwrap()),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("machine aarch64"), "{stdout}");
    assert!(stdout.contains("round 1 aggregated the update of arm-1 at rank 4"), "{stdout}");
    assert!(stdout.contains("aarch64 smoke: passed"), "{stdout}");
}
