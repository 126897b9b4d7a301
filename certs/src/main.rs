//! `flotilla-certs`: provisioning of the CA, the coordinator and the devices.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use flotilla_certs::{
    CoordinatorRequest, DeviceRequest, Pki, DEFAULT_CA_DAYS, DEFAULT_COORDINATOR_DAYS, DEFAULT_DEVICE_DAYS,
};

/// Provision credentials for a Flotilla deployment: a CA, the coordinator's certificate and one
/// credential kit per device. Mutual TLS is mandatory: every participant needs a kit from here.
#[derive(Parser)]
#[command(name = "flotilla-certs", version)]
struct Cli {
    /// The PKI directory (holds the CA, the registry of issued certificates and the kits).
    #[arg(long, default_value = "pki", env = "FLOTILLA_PKI_DIR")]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
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
    /// List every certificate issued by this CA, with revocations.
    List,
    /// Revoke a device's certificate: it goes into crl.pem, which a running coordinator reloads.
    Revoke {
        #[arg(long)]
        id: String,
    },
}

#[derive(Subcommand)]
enum IssueCommand {
    /// The coordinator's server certificate (SANs: the name, localhost, 127.0.0.1 and any --san).
    Coordinator {
        /// DNS name devices use to reach the coordinator.
        #[arg(long, default_value = "coordinator")]
        name: String,
        /// Additional subject alternative name (DNS name or IP address); repeatable.
        #[arg(long)]
        san: Vec<String>,
        #[arg(long, default_value_t = DEFAULT_COORDINATOR_DAYS)]
        days: u32,
    },
    /// A device's client certificate; the device id goes into a URI SAN.
    Device {
        /// Device id: letters, digits, '-' and '_' (at most 64).
        #[arg(long)]
        id: String,
        #[arg(long, default_value_t = DEFAULT_DEVICE_DAYS)]
        days: u32,
    },
}

fn main() {
    if let Err(error) = run(Cli::parse()) {
        eprintln!("flotilla-certs: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init { name, days } => {
            Pki::init(&cli.dir, &name, days).context("cannot create the CA")?;
            println!("created CA in {}", cli.dir.display());
        }
        Command::Issue { what } => {
            let pki = Pki::open(&cli.dir)?;
            let issued = match what {
                IssueCommand::Coordinator { name, san, days } => pki
                    .issue_coordinator(&CoordinatorRequest { name: &name, sans: &san, days })
                    .context("cannot issue the coordinator certificate")?,
                IssueCommand::Device { id, days } => pki
                    .issue_device(&DeviceRequest { id: &id, days })
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
        }
        Command::List => {
            let pki = Pki::open(&cli.dir)?;
            let registry = pki.registry()?;
            for cert in &registry.issued {
                let revoked = registry.revoked.iter().any(|r| r.serial == cert.serial);
                println!(
                    "{:<12} {:<24} serial {:<6} until {}{}",
                    cert.kind,
                    cert.id,
                    cert.serial,
                    cert.not_after,
                    if revoked { "  REVOKED" } else { "" }
                );
            }
        }
        Command::Revoke { id } => {
            let pki = Pki::open(&cli.dir)?;
            let revoked = pki.revoke(&id).with_context(|| format!("cannot revoke '{id}'"))?;
            println!(
                "revoked device '{}' (serial {}); the CRL is {}",
                revoked.id,
                revoked.serial,
                Pki::crl_path(&cli.dir).display()
            );
        }
    }
    Ok(())
}
