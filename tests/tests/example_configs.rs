//! The example configurations in `deploy/examples/` (MiniLM, SmolLM2, Fashion-MNIST, secure, private) pass
//! `check` once `deploy/examples/prepare.sh` has made what they refer to, with their relative
//! paths resolved against the working directory as documented; and `check` leaves no run
//! directory behind.

use std::process::Command;

use flotilla_tests::{binary, run_ok, workspace_root};

#[test]
fn every_example_configuration_passes_check_after_prepare() {
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = binary("flotilla-certs").parent().unwrap().to_path_buf();
    run_ok(
        Command::new("bash")
            .arg(workspace_root().join("deploy/examples/prepare.sh"))
            .arg("runs/example")
            .current_dir(dir.path())
            .env("FLOTILLA_BIN_DIR", &bin_dir),
    );
    for example in ["minilm", "smollm2", "fashion-mnist", "secure", "private"] {
        let config = workspace_root().join(format!("deploy/examples/{example}.toml"));
        let output = Command::new(binary("flotilla-coordinator"))
            .args(["check", "--config"])
            .arg(&config)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{example}: {text}");
        assert!(text.contains(": OK"), "{example}: {text}");
        // The evaluated set's class mix: every class is there.
        let mix = text.lines().find(|l| l.starts_with("evaluation: ")).unwrap_or_else(|| panic!("{text}"));
        let expected: &[&str] = if example == "minilm" {
            &["(the whole test split)", "business ", "entertainment ", "politics ", "sports ", "tech "]
        } else if example == "smollm2" {
            &["32 examples (a stratified sample seeded with 42)", "business ", "politics ", "tech "]
        } else {
            &["5000 examples (the whole test split after the first 5000)", "0 ", "9 "]
        };
        for part in expected {
            assert!(mix.contains(part), "{example}: '{part}' missing from {mix}");
        }
        assert!(!dir.path().join("runs/example").join(example).exists(), "{example}: check created its run directory");
    }
    // Run elsewhere, the same file's relative paths name nothing: check says so.
    let elsewhere = tempfile::tempdir().unwrap();
    let output = Command::new(binary("flotilla-coordinator"))
        .args(["check", "--config"])
        .arg(workspace_root().join("deploy/examples/fashion-mnist.toml"))
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("runs/example/pki/kits/coordinator"), "{stderr}");
}
