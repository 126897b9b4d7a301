//! The study harness end to end on two of its cells (the full study is `bash deploy/study.sh`):
//! provisioning, a coordinator and a simulated 20-device fleet per cell over QUIC, cached results,
//! and the generated document and figure.

use std::process::Command;

use flotilla_tests::binary;

#[test]
fn two_quick_cells_run_through_the_real_system_and_are_reported() {
    let data = std::path::Path::new("/usr/share/datasets/fashion-mnist");
    let data = std::env::var_os("FLOTILLA_FASHION_MNIST").map(std::path::PathBuf::from).unwrap_or(data.into());
    if !data.join("train-images-idx3-ubyte.gz").exists() && !data.join("train-images-idx3-ubyte").exists() {
        eprintln!("skipped: no Fashion-MNIST in {} (bash deploy/quickstart.sh installs it)", data.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = binary("flotilla-coordinator").parent().unwrap().to_path_buf();
    let run = || {
        Command::new(binary("flotilla-study"))
            .args(["--quick", "--only", "full-rbla,quarter-flora"])
            .arg("--bin-dir")
            .arg(&bin_dir)
            .arg("--data")
            .arg(&data)
            .arg("--work")
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let output = run();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(stderr.matches("final accuracy").count(), 2, "{stderr}");

    let doc = std::fs::read_to_string(dir.path().join("study.md")).unwrap();
    assert!(doc.contains("2 of 13 cells finished"), "{doc}");
    let row = doc.lines().find(|l| l.starts_with("| rbla | ")).unwrap();
    let accuracy: f64 = row.split('|').nth(2).unwrap().split('±').next().unwrap().trim().parse().unwrap();
    assert!(accuracy > 50.0, "{row}");
    // Online FLoRA ships ΔW with every task after the first round: more down than up.
    let flora = doc.lines().find(|l| l.starts_with("| flora | ") && !l.contains(" – ")).unwrap();
    let cells: Vec<f64> = flora.split('|').filter_map(|c| c.trim().parse().ok()).collect();
    assert!(cells[1] > cells[0], "MB down > MB up for flora: {flora}");
    assert!(std::fs::read_to_string(dir.path().join("figures/study/alpha0.5-full.svg")).unwrap().contains("<svg"));

    // Cached: a rerun runs nothing.
    let again = run();
    assert!(again.status.success());
    assert!(!String::from_utf8_lossy(&again.stderr).contains("final accuracy"));
}
