//! `flotilla-certs`: provisioning of the CA, the coordinator and the devices.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use flotilla_certs::inspect::{describe_pem, CertificateInfo};
use flotilla_certs::kit::{Placement, DEFAULT_INSTALL_DIR, DEFAULT_LISTEN, DEFAULT_PORT, DEFAULT_SERVER_NAME};
use flotilla_certs::{
    csr, read_password_file, CoordinatorRequest, DeviceRequest, Pki, DEFAULT_CA_DAYS, DEFAULT_COORDINATOR_DAYS,
};

/// Provision credentials for a Flotilla deployment: a CA, the coordinator's certificate and one
/// credential kit per device. Mutual TLS is mandatory: every participant needs a kit from here.
#[derive(Parser)]
#[command(name = "flotilla-certs", version)]
struct Cli {
    /// The PKI directory (holds the CA, the registry of issued certificates and the kits).
    #[arg(long, global = true, default_value = "pki", env = "FLOTILLA_PKI_DIR")]
    dir: PathBuf,
    /// File whose first line is the CA key's password (`init` encrypts the key with it).
    #[arg(long, global = true, env = "FLOTILLA_CA_PASSWORD_FILE")]
    ca_password_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct PlacementArgs {
    /// Where the kit will live on its machine (written into its configuration snippet) [default:
    /// /etc/flotilla/kit; for `issue devices`, each kit's own directory <pki>/kits/<id>, where the
    /// simulator and tests on this machine use it]
    #[arg(long)]
    install_dir: Option<PathBuf>,
    /// Devices: the coordinator's host:port [default: the name of the coordinator certificate this
    /// CA issued, and the port its kit listens on]. Coordinator: the address to listen on [default:
    /// 0.0.0.0:4433].
    #[arg(long)]
    address: Option<String>,
    /// Devices: the name in the coordinator's certificate [default: that of the coordinator
    /// certificate this CA issued].
    #[arg(long)]
    server_name: Option<String>,
}

impl PlacementArgs {
    /// The coordinator's kit: where it listens.
    fn coordinator(&self) -> Placement {
        Placement {
            install_dir: self.install_dir.clone().unwrap_or_else(|| DEFAULT_INSTALL_DIR.into()),
            address: self.address.clone().unwrap_or_else(|| DEFAULT_LISTEN.into()),
            server_name: String::new(),
        }
    }

    /// A device's kit: where it reaches the coordinator, by default as `pki` knows it (a device
    /// making its own request has no PKI at hand: `coordinator:4433` unless told).
    fn device(&self, pki: Option<&Pki>) -> Result<Placement> {
        let known = match pki {
            Some(pki) => pki.coordinator_endpoint().context("cannot read the coordinator's certificate")?,
            None => None,
        };
        if pki.is_some() && known.is_none() && (self.address.is_none() || self.server_name.is_none()) {
            eprintln!(
                "note: this CA has issued no coordinator certificate yet; the kit points at \
                 {DEFAULT_SERVER_NAME}:{DEFAULT_PORT} unless --address and --server-name say otherwise"
            );
        }
        let (name, port) = known.unwrap_or_else(|| (DEFAULT_SERVER_NAME.to_string(), DEFAULT_PORT));
        Ok(Placement {
            install_dir: self.install_dir.clone().unwrap_or_else(|| DEFAULT_INSTALL_DIR.into()),
            address: self.address.clone().unwrap_or_else(|| format!("{name}:{port}")),
            server_name: self.server_name.clone().unwrap_or(name),
        })
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new certificate authority (ECDSA P-256) in the PKI directory.
    Init {
        /// Common name of the CA certificate.
        #[arg(long, default_value = "Flotilla CA")]
        name: String,
        /// Validity of the CA certificate in days.
        #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
        days: u32,
    },
    /// Issue a certificate and write a kit directory (kits/<name>/) for one participant.
    Issue {
        #[command(subcommand)]
        what: IssueCommand,
    },
    /// On a device: make a key and a certificate request (the key never leaves the device).
    Request {
        /// The device's id.
        #[arg(long)]
        id: String,
        /// The device's kit directory (created if missing).
        #[arg(long)]
        kit: PathBuf,
        #[command(flatten)]
        placement: PlacementArgs,
    },
    /// At the CA: sign a device's request.csr; writes cert.pem and ca.crt for `install`.
    Sign {
        #[arg(long)]
        csr: PathBuf,
        /// Directory for the signed certificate (default: <pki>/signed/<id>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity of the certificate: 30d, 12h, 90s, ...
        #[arg(long, default_value = "30days", value_parser = parse_validity)]
        valid_for: std::time::Duration,
        /// The request renews the certificate of a device that already has one.
        #[arg(long)]
        renew: bool,
    },
    /// On a device: install a signed certificate into the kit (checked against the CA and the key).
    Install {
        #[arg(long)]
        kit: PathBuf,
        /// The signed certificate (from `sign`).
        #[arg(long)]
        cert: PathBuf,
        /// The CA certificate [default: the kit's ca.crt, else the ca.crt `sign` wrote beside --cert].
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// On a device: a new key and request for the kit's id, for `sign --renew`; the current
    /// certificate keeps working until the new one is installed.
    Renew {
        #[arg(long)]
        kit: PathBuf,
    },
    /// List every certificate issued by this CA, with revocations.
    List {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Show one certificate: by id (from this CA's records) or from a file.
    Inspect {
        #[arg(long, conflicts_with = "cert", required_unless_present = "cert")]
        id: Option<String>,
        #[arg(long)]
        cert: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Revoke a device (or, with `--id coordinator`, the coordinator): every certificate issued for
    /// it (or only --serial's) goes into crl.pem, which a running coordinator reloads, closing the
    /// sessions they opened, and which devices whose kits carry it check the coordinator against.
    Revoke {
        #[arg(long)]
        id: String,
        /// Revoke only this certificate of the device (hex, as `list` shows it).
        #[arg(long)]
        serial: Option<String>,
    },
}

#[derive(Subcommand)]
enum IssueCommand {
    /// The coordinator's server certificate (SANs: the name, any --san, and with --loopback
    /// localhost, 127.0.0.1 and ::1).
    Coordinator {
        /// DNS name devices use to reach the coordinator.
        #[arg(long, default_value = "coordinator")]
        name: String,
        /// Additional subject alternative name (DNS name or IP address); repeatable.
        #[arg(long)]
        san: Vec<String>,
        /// Also name localhost, 127.0.0.1 and ::1, for a coordinator reached on this machine.
        #[arg(long)]
        loopback: bool,
        #[arg(long, default_value_t = DEFAULT_COORDINATOR_DAYS)]
        days: u32,
        #[command(flatten)]
        placement: PlacementArgs,
    },
    /// Many device kits at once, for trials and simulations: ids `<prefix>-0000`, `<prefix>-0001`, ...
    Devices {
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        count: usize,
        /// Number of the first id.
        #[arg(long, default_value_t = 0)]
        start: usize,
        /// Validity of each certificate: 30d, 12h, 90s, ...
        #[arg(long, default_value = "30days", value_parser = parse_validity)]
        valid_for: std::time::Duration,
        #[command(flatten)]
        placement: PlacementArgs,
    },
    /// A device's client certificate; the device id goes into a URI SAN.
    Device {
        /// Device id: letters, digits, '-' and '_' (at most 64).
        #[arg(long)]
        id: String,
        /// Validity of each certificate: 30d, 12h, 90s, ...
        #[arg(long, default_value = "30days", value_parser = parse_validity)]
        valid_for: std::time::Duration,
        #[command(flatten)]
        placement: PlacementArgs,
    },
}

/// A validity such as `30d`, `12h` or `90s` (humantime syntax).
fn parse_validity(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("'{text}': {e} (examples: 30d, 12h, 90s)"))
}

fn main() {
    if let Err(error) = run(Cli::parse()) {
        eprintln!("flotilla-certs: {error:#}");
        std::process::exit(1);
    }
}

fn print(info: &CertificateInfo, format: Format) -> Result<()> {
    match format {
        Format::Text => print!("{}", info.to_text()),
        Format::Json => println!("{}", serde_json::to_string_pretty(info)?),
    }
    Ok(())
}

/// `issue devices`: kits `<prefix>-<n>` for n in start..start+count, zero-padded so they sort.
fn issue_devices(
    pki: &Pki,
    dir: &std::path::Path,
    prefix: &str,
    count: usize,
    start: usize,
    validity: std::time::Duration,
    placement: &PlacementArgs,
) -> Result<()> {
    anyhow::ensure!(count >= 1, "--count must be at least 1");
    let width = (start + count - 1).to_string().len().max(4);
    let reach = placement.device(Some(pki))?;
    let install_dir = &placement.install_dir;
    for n in start..start + count {
        let id = format!("{prefix}-{n:0width$}");
        // Each kit's snippet points at its own directory unless an install dir is given.
        let mut placement = reach.clone();
        if install_dir.is_none() {
            placement.install_dir = pki.kit_dir(&id);
        }
        pki.issue_device(&DeviceRequest { id: &id, validity }, &placement)
            .with_context(|| format!("cannot issue a certificate for device '{id}'"))?;
    }
    println!(
        "issued {count} device kits {prefix}-{start:0width$} .. {prefix}-{:0width$} in {}",
        start + count - 1,
        dir.join("kits").display()
    );
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let password = cli.ca_password_file.as_deref().map(read_password_file).transpose()?;
    let open = || Pki::open(&cli.dir, password.clone());
    match cli.command {
        Command::Init { name, days } => {
            Pki::init(&cli.dir, &name, days, password.as_deref()).context("cannot create the CA")?;
            let protected = if password.is_some() { " (key password-protected)" } else { "" };
            println!("created CA in {}{protected}", cli.dir.display());
        }
        Command::Issue { what } => issue(&open()?, &cli.dir, what)?,
        Command::Request { id, kit, placement } => {
            let request = csr::request(&kit, &id, &placement.device(None)?)
                .with_context(|| format!("cannot make a request for device '{id}'"))?;
            println!("request for device '{id}' in {}; have the CA sign it, then `install`", request.display());
        }
        Command::Sign { csr, out, valid_for, renew } => sign(&open()?, &cli.dir, &csr, out, valid_for, renew)?,
        Command::Install { kit, cert, ca } => {
            let id = csr::install(&kit, &cert, ca.as_deref())
                .with_context(|| format!("cannot install {} into {}", cert.display(), kit.display()))?;
            let info = describe_pem(&std::fs::read(kit.join("cert.pem"))?)?;
            println!(
                "installed the certificate of device '{id}' in {} (valid until {})",
                kit.display(),
                info.not_after
            );
        }
        Command::Renew { kit } => {
            let (id, request) = csr::renew(&kit).with_context(|| format!("cannot renew {}", kit.display()))?;
            println!(
                "renewal request for device '{id}' in {}; have the CA run `sign --renew`, then `install`",
                request.display()
            );
        }
        Command::List { format } => list(&open()?, format)?,
        Command::Inspect { id, cert, format } => {
            let info = match id {
                Some(id) => open()?.inspect_id(&id)?,
                None => inspect_file(&cli.dir, cert)?,
            };
            print(&info, format)?;
        }
        Command::Revoke { id, serial } => {
            let pki = open()?;
            let revoked = pki.revoke(&id, serial.as_deref()).with_context(|| format!("cannot revoke '{id}'"))?;
            let serials: Vec<&str> = revoked.iter().map(|r| r.serial.as_str()).collect();
            println!(
                "revoked device '{id}' ({} {}); the CRL is {}",
                if serials.len() == 1 { "serial" } else { "serials" },
                serials.join(", "),
                Pki::crl_path(&cli.dir).display()
            );
        }
    }
    Ok(())
}

/// `issue coordinator|device|devices`.
fn issue(pki: &Pki, dir: &Path, what: IssueCommand) -> Result<()> {
    let issued = match what {
        IssueCommand::Coordinator { name, san, loopback, days, placement } => pki
            .issue_coordinator(
                &CoordinatorRequest { name: &name, sans: &san, days, loopback },
                &placement.coordinator(),
            )
            .context("cannot issue the coordinator certificate")?,
        IssueCommand::Devices { prefix, count, start, valid_for, placement } => {
            return issue_devices(pki, dir, &prefix, count, start, valid_for, &placement);
        }
        IssueCommand::Device { id, valid_for, placement } => pki
            .issue_device(&DeviceRequest { id: &id, validity: valid_for }, &placement.device(Some(pki))?)
            .with_context(|| format!("cannot issue a certificate for device '{id}'"))?,
    };
    println!(
        "issued {} '{}' (serial {}, valid until {}): kit in {}",
        issued.kind,
        issued.id,
        issued.serial,
        issued.not_after,
        issued.kit.display()
    );
    Ok(())
}

/// `sign`: a device's request, into `out` or `<pki>/signed/<id>/`.
fn sign(pki: &Pki, dir: &Path, csr: &Path, out: Option<PathBuf>, valid_for: Duration, renew: bool) -> Result<()> {
    let pem = std::fs::read_to_string(csr).with_context(|| format!("cannot read {}", csr.display()))?;
    // The output directory is named after the id, which is known only once the request is checked.
    let staging = dir.join("signed").join(".incoming");
    let target = out.clone().unwrap_or_else(|| staging.clone());
    let issued =
        pki.sign_request(&pem, valid_for, renew, &target).with_context(|| format!("cannot sign {}", csr.display()))?;
    let written = match out {
        Some(dir) => dir,
        None => {
            let dir = dir.join("signed").join(&issued.id);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&staging, &dir).with_context(|| format!("cannot move to {}", dir.display()))?;
            dir
        }
    };
    let what = if issued.renews.is_some() { "renewed" } else { "signed" };
    println!(
        "{what} device '{}' (serial {}, valid until {}): cert.pem and ca.crt in {}",
        issued.id,
        issued.serial,
        issued.not_after,
        written.display()
    );
    Ok(())
}

/// `list`: every certificate issued, with its revocation.
fn list(pki: &Pki, format: Format) -> Result<()> {
    let registry = pki.registry()?;
    match format {
        Format::Json => {
            let rows: Vec<serde_json::Value> = registry
                .issued
                .iter()
                .map(|c| {
                    let mut row = serde_json::to_value(c).unwrap_or_default();
                    row["revoked"] = serde_json::Value::Bool(registry.is_revoked(&c.serial));
                    row
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Format::Text => {
            for cert in &registry.issued {
                println!(
                    "{:<12} {:<24} serial {:<6} until {}{}",
                    cert.kind,
                    cert.id,
                    cert.serial,
                    cert.not_after,
                    if registry.is_revoked(&cert.serial) { "  REVOKED" } else { "" }
                );
            }
        }
    }
    Ok(())
}

/// `inspect --cert`: a certificate file, with its revocation when this directory's CA issued it.
fn inspect_file(dir: &Path, cert: Option<PathBuf>) -> Result<CertificateInfo> {
    let Some(path) = cert else { anyhow::bail!("give --id or --cert") };
    let pem = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut info = describe_pem(&pem).with_context(|| path.display().to_string())?;
    // Revocation is known only for certificates of this directory's CA.
    let ca = std::fs::read(Pki::ca_cert_path(dir)).ok().and_then(|pem| describe_pem(&pem).ok());
    if let (Some(ca), Ok(pki)) = (ca, Pki::open(dir, None)) {
        if ca.subject == info.issuer {
            info.revoked = pki.is_revoked(&info.serial).ok();
        }
    }
    Ok(info)
}
