//! The deployment artefacts agree with each other and with the binaries: the Kubernetes
//! configuration passes `flotilla-coordinator check` once a real kit is in place; the manifests and
//! the container file use the ports, paths, user and libtorch pin that configuration and
//! `deploy/bootstrap-libtorch.sh` use; and `check` reports a broken deployment.

use std::process::Command;

use flotilla_tests::{binary, provision, workspace_root};

fn read(relative: &str) -> String {
    std::fs::read_to_string(workspace_root().join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn check(config: &std::path::Path, env: &[(&str, &std::path::Path)]) -> std::process::Output {
    let mut command = Command::new(binary("flotilla-coordinator"));
    command.args(["check", "--config"]).arg(config);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

#[test]
fn the_kubernetes_configuration_passes_check_with_a_real_kit() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    provision(&pki, &[]);
    let kit = pki.join("kits/coordinator");
    let config = workspace_root().join("deploy/kubernetes/coordinator.toml");
    let run_dir = dir.path().join("run");
    let crl = kit.join("crl.pem");
    let ok = check(
        &config,
        &[("FLOTILLA__TLS__KIT", &kit), ("FLOTILLA__TLS__CRL", &crl), ("FLOTILLA__SERVER__RUN_DIR", &run_dir)],
    );
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{stdout}{}", String::from_utf8_lossy(&ok.stderr));
    assert!(stdout.contains("QUIC on 0.0.0.0:4433, metrics on 0.0.0.0:9100"), "{stdout}");

    // Every file the Secret is generated from is one a coordinator kit has.
    let kustomization = read("deploy/kubernetes/kustomization.yaml");
    for file in ["ca.crt", "cert.pem", "key.pem", "crl.pem"] {
        assert!(kustomization.contains(&format!("- kit/{file}")), "{file} missing from the secretGenerator");
        assert!(kit.join(file).exists(), "a coordinator kit has no {file}");
    }

    // As it stands (no kit at /etc/flotilla/kit here), check names the problem and fails.
    let broken = check(&config, &[("FLOTILLA__SERVER__RUN_DIR", &run_dir)]);
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(!broken.status.success(), "{stderr}");
    assert!(
        stderr.contains("problem(s)") && stderr.contains("[tls]") && stderr.contains("/etc/flotilla/kit"),
        "{stderr}"
    );
}

#[test]
fn manifests_and_container_agree_on_ports_paths_user_and_libtorch() {
    let config = read("deploy/kubernetes/coordinator.toml");
    let statefulset = read("deploy/kubernetes/statefulset.yaml");
    let service = read("deploy/kubernetes/service.yaml");
    let dockerfile = read("deploy/container/Dockerfile");
    let bootstrap = read("deploy/bootstrap-libtorch.sh");

    // Ports: QUIC over UDP, metrics and health over TCP.
    assert!(config.contains("listen = \"0.0.0.0:4433\"") && config.contains("listen = \"0.0.0.0:9100\""));
    assert!(statefulset.contains("containerPort: 4433\n              protocol: UDP"), "{statefulset}");
    assert!(statefulset.contains("containerPort: 9100\n              protocol: TCP"), "{statefulset}");
    assert!(service.contains("protocol: UDP\n      port: 4433"), "{service}");
    assert!(dockerfile.contains("EXPOSE 4433/udp 9100/tcp"));
    assert_eq!(statefulset.matches("path: /healthz").count(), 3, "readiness, liveness and startup probes");

    // Binaries: every one the workspace builds is in the image; the coordinator's front end needs
    // flotilla-coordinator-torch beside it.
    for bin in ["flotilla-coordinator", "flotilla-coordinator-torch", "flotilla-edge", "flotilla-certs"] {
        assert!(dockerfile.contains(&format!("target/release/{bin} ")), "the image lacks {bin}");
    }

    // Paths: the config file, the kit and the run directory are where the config says.
    assert!(config.contains("run_dir = \"/var/lib/flotilla\"") && statefulset.contains("mountPath: /var/lib/flotilla"));
    assert!(config.contains("kit = \"/etc/flotilla/kit\"") && statefulset.contains("mountPath: /etc/flotilla/kit"));
    assert!(statefulset.contains("mountPath: /etc/flotilla/coordinator.toml"));
    assert!(statefulset.contains("\"--config\", \"/etc/flotilla/coordinator.toml\""));
    assert!(dockerfile.contains("CMD [\"serve\", \"--config\", \"/etc/flotilla/coordinator.toml\"]"));

    // The unprivileged user of the image is the one the pod runs as.
    assert!(dockerfile.contains("--uid 10001") && statefulset.contains("runAsUser: 10001"));

    // One libtorch pin for the bootstrap and the images.
    let pin = bootstrap
        .lines()
        .find_map(|l| l.strip_prefix("FLOTILLA_TORCH_VERSION=\""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("FLOTILLA_TORCH_VERSION in bootstrap-libtorch.sh");
    assert!(dockerfile.contains(&format!("ARG TORCH_VERSION={pin}")), "the images must pin torch {pin}");
}
