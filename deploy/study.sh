#!/usr/bin/env bash
# The study, through the real coordinator and simulator over mutual-TLS QUIC; rewrites its
# generated block of docs/study.md and its figures (docs/study.md says what each suite is).
#
#   bash deploy/study.sh --suite image-shift     # second edition, rotated Fashion-MNIST: about 1.5 hours on 2 cores
#   bash deploy/study.sh --suite text            # second edition, all-MiniLM-L6-v2 on BBC News: hours (resumable)
#   bash deploy/study.sh --suite text-reviews    # the same grid on Rotten Tomatoes
#   bash deploy/study.sh --suite headlines       # the decoder (SmolLM2) writing BBC headlines: about 8 hours
#   bash deploy/study.sh                          # first edition (Fashion-MNIST, MLP): about 45 minutes
#   bash deploy/study.sh --suite image-shift --quick   # minutes; writes runs/study-<suite>-quick/study.md, leaves docs/ alone
# Finished runs are cached in study/results/<suite>/ (committed; the first edition and --quick:
# runs/study*/results/); rerunning only runs what is missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=deploy/env.sh
source "$root/deploy/env.sh"
flotilla_ensure_fashion_mnist
case " $* " in
    *" --suite text"*|*" --suite=text"*|*" --suite headlines"*|*" --suite=headlines"*)
        # shellcheck source=deploy/fetch-text-assets.sh
        source "$root/deploy/fetch-text-assets.sh"
        ;;
esac
echo "==> building release binaries" >&2
cargo build --release --bins --quiet
exec "$root/target/release/flotilla-study" --bin-dir "$root/target/release" "$@"
