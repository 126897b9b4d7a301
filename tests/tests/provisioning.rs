//! Provisioning end to end with the real binaries: a password-protected CA; a coordinator kit whose
//! configuration snippet the coordinator uses; one device kit made by the CA and one device that
//! makes its own key (request → sign → install); list and inspect in JSON; a federated round between
//! them; and the errors an operator meets (wrong password, an id issued twice).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flotilla_tests::{binary, start_coordinator_with, Process};

fn certs_cmd(pki: &Path, password_file: &Path) -> Command {
    let mut command = Command::new(binary("flotilla-certs"));
    command.arg("--dir").arg(pki).env("FLOTILLA_CA_PASSWORD_FILE", password_file);
    command
}

fn ok(command: &mut Command) -> String {
    String::from_utf8_lossy(&flotilla_tests::run_ok(command).stdout).to_string()
}

fn fails(command: &mut Command) -> String {
    let output = command.output().unwrap();
    assert!(!output.status.success(), "{command:?} should have failed");
    String::from_utf8_lossy(&output.stderr).to_string()
}

/// KEY=VALUE lines of an environment file.
fn env_file(path: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn kits_requests_and_renewals_provision_a_working_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = root.join("pki");
    let password = root.join("ca-password");
    std::fs::write(&password, "correct horse battery staple\n").unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let address = format!("127.0.0.1:{port}");

    ok(certs_cmd(&pki, &password).args(["init", "--name", "Trial CA"]));
    let coordinator_kit = pki.join("kits/coordinator");
    ok(certs_cmd(&pki, &password)
        .args(["issue", "coordinator", "--name", "localhost", "--address", &address, "--install-dir"])
        .arg(&coordinator_kit));
    let made_kit = pki.join("kits/made");
    ok(certs_cmd(&pki, &password)
        .args(["issue", "device", "--id", "made", "--address", &address, "--server-name", "localhost"])
        .arg("--install-dir")
        .arg(&made_kit));

    // A device that makes its own key: the CA only ever sees request.csr.
    let own_kit = root.join("device/kit");
    let out = ok(Command::new(binary("flotilla-certs"))
        .args(["request", "--id", "field-1", "--address", &address, "--server-name", "localhost", "--kit"])
        .arg(&own_kit)
        .arg("--install-dir")
        .arg(&own_kit));
    assert!(out.contains("request for device 'field-1'"), "{out}");
    let out = ok(certs_cmd(&pki, &password).arg("sign").arg("--csr").arg(own_kit.join("request.csr")));
    assert!(out.contains("signed device 'field-1'"), "{out}");
    let signed = pki.join("signed/field-1");
    assert!(!signed.join("key.pem").exists());
    ok(Command::new(binary("flotilla-certs"))
        .arg("install")
        .arg("--kit")
        .arg(&own_kit)
        .arg("--cert")
        .arg(signed.join("cert.pem"))
        .arg("--ca")
        .arg(signed.join("ca.crt")));

    // Operators' errors are one clear line.
    let wrong = root.join("wrong-password");
    std::fs::write(&wrong, "hunter2\n").unwrap();
    let err = fails(certs_cmd(&pki, &wrong).args(["issue", "device", "--id", "other"]));
    assert!(err.contains("wrong CA password"), "{err}");
    let err = fails(certs_cmd(&pki, &password).args(["issue", "device", "--id", "made"]));
    assert!(err.contains("already has a certificate"), "{err}");
    let err = fails(certs_cmd(&pki, &password).arg("sign").arg("--csr").arg(root.join("missing.csr")));
    assert!(err.contains("missing.csr"), "{err}");

    // list and inspect, for scripts.
    let listing: serde_json::Value =
        serde_json::from_str(&ok(certs_cmd(&pki, &password).args(["list", "--format", "json"]))).unwrap();
    let ids: Vec<&str> = listing.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["coordinator", "made", "field-1"]);
    assert!(listing.as_array().unwrap().iter().all(|c| c["revoked"] == false));
    let info: serde_json::Value =
        serde_json::from_str(&ok(certs_cmd(&pki, &password).args(["inspect", "--id", "field-1", "--format", "json"])))
            .unwrap();
    assert_eq!(info["kind"], "device");
    assert_eq!(info["extended_key_usage"], serde_json::json!(["clientAuth"]));
    assert_eq!(info["revoked"], false);
    assert!(info["days_left"].as_i64().unwrap() >= 29, "{info}");
    let text = ok(Command::new(binary("flotilla-certs")).arg("inspect").arg("--cert").arg(own_kit.join("cert.pem")));
    assert!(text.contains("id:          field-1") && text.contains("clientAuth"), "{text}");

    // The coordinator runs on its kit's snippet (plus a run-specific round and model section).
    let run = root.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let mut config = std::fs::read_to_string(coordinator_kit.join("coordinator.toml")).unwrap();
    config.push_str(
        "\n[round]\nrounds = 1\nmin_devices = 2\nlocal_steps = 5\n\
         [model.architecture.mlp]\ninput = 16\nhidden = [8]\nclasses = 4\n",
    );
    let (mut coordinator, bound) = start_coordinator_with(&run, &config, &["--run-dir", run.to_str().unwrap()]);
    assert_eq!(bound, address);

    // Each device runs on its kit's environment file alone.
    let mut devices: Vec<Process> = [("made", &made_kit), ("field-1", &own_kit)]
        .iter()
        .map(|(id, kit)| {
            let mut command = Command::new(binary("flotilla-edge"));
            command.args(["run", "--rank", "2", "--samples", "64"]).envs(env_file(&kit.join("edge.env")));
            Process::spawn(id, &mut command, &run.join("logs"))
        })
        .collect();
    assert!(coordinator.wait(Duration::from_secs(90)).success(), "{}", coordinator.logs());
    for device in &mut devices {
        assert!(device.wait(Duration::from_secs(30)).success(), "{}", device.logs());
    }
    assert!(coordinator.stdout_text().contains("run finished: 1 round(s)"), "{}", coordinator.logs());

    // Renewal: a new key and certificate for the same id, refused without --renew.
    ok(Command::new(binary("flotilla-certs")).arg("renew").arg("--kit").arg(&own_kit));
    let err = fails(certs_cmd(&pki, &password).arg("sign").arg("--csr").arg(own_kit.join("request.csr")));
    assert!(err.contains("already has a certificate"), "{err}");
    let out = ok(certs_cmd(&pki, &password).args(["sign", "--renew", "--csr"]).arg(own_kit.join("request.csr")));
    assert!(out.contains("renewed device 'field-1'"), "{out}");
    let old_key = std::fs::read(own_kit.join("key.pem")).unwrap();
    ok(Command::new(binary("flotilla-certs"))
        .arg("install")
        .arg("--kit")
        .arg(&own_kit)
        .arg("--cert")
        .arg(signed.join("cert.pem")));
    assert_ne!(std::fs::read(own_kit.join("key.pem")).unwrap(), old_key);
}
