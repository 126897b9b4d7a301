//! `deploy/netns-trial.sh`: the coordinator and five devices in separate network namespaces, each
//! device's link capped by `tbf` for its class, run two real rounds on Fashion-MNIST; the caps bind
//! (a 1 Mbit/s phone takes at least what its token bucket allows, and far longer than the 1 Gbit/s
//! box to receive the base model). Needs root and iproute2, as the CI machine has; where network
//! namespaces cannot be made or iproute2's `tc` is missing, the test says so and does nothing.

use std::process::Command;

use flotilla_tests::{binary, workspace_root};

fn namespaces_available() -> Result<(), String> {
    for tool in ["tc", "python3"] {
        Command::new(tool).arg("-V").output().map_err(|e| format!("no `{tool}`: {e}"))?;
    }
    let probe = format!("fl-probe-{}", std::process::id());
    let added = Command::new("ip").args(["netns", "add", &probe]).output().map_err(|e| format!("no `ip`: {e}"))?;
    if !added.status.success() {
        return Err(String::from_utf8_lossy(&added.stderr).trim().to_string());
    }
    let _ = Command::new("ip").args(["netns", "delete", &probe]).status();
    Ok(())
}

#[test]
fn a_trial_across_namespaces_with_capped_links() {
    if let Err(why) = namespaces_available() {
        eprintln!("netns trial not run: network namespaces are unavailable here ({why})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("trial");
    let bin_dir = binary("flotilla-coordinator").parent().unwrap().to_path_buf();
    let output = Command::new("bash")
        .arg(workspace_root().join("deploy/netns-trial.sh"))
        .env("FLOTILLA_BIN_DIR", &bin_dir)
        .env("FLOTILLA_RUN_DIR", &run_dir)
        .env("FLOTILLA_ROUNDS", "2")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("run finished: 2 round(s)"), "{stdout}");

    // device class rank link <download> s <update> KiB <upload> s <minimum> s
    let links = std::fs::read_to_string(run_dir.join("links.txt")).unwrap();
    let row = |device: &str| -> (f64, f64, f64) {
        let line = links.lines().find(|l| l.starts_with(device)).unwrap_or_else(|| panic!("{device}:\n{links}"));
        let numbers: Vec<f64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        // rank, download, update KiB, upload, minimum
        (numbers[1], numbers[3], numbers[4])
    };
    for device in ["phone-1", "phone-2", "laptop-1", "desktop-1", "gpu-1"] {
        let (_, upload, minimum) = row(device);
        assert!(upload >= minimum, "{device} uploaded faster than its link allows:\n{links}");
    }
    let (phone_download, phone_upload, _) = row("phone-1");
    let (gpu_download, _, _) = row("gpu-1");
    assert!(phone_upload > 0.05, "{links}");
    assert!(phone_download > 10.0 * gpu_download, "{links}");
    // Nothing is left behind.
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&left.stdout).contains("-coordinator"), "namespaces left behind");
}
