"""Record-level differential privacy at the site: DP-SGD (Opacus), model checks, the privacy ledger."""
