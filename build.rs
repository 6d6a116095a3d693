//! Rebuild when a Postgres migration is added: `sqlx::migrate!` embeds `schemas/postgres`
//! at compile time, and cargo does not otherwise notice a new file there (a cached target
//! directory would ship a binary without the migration).
fn main() {
    println!("cargo:rerun-if-changed=schemas/postgres");
}
