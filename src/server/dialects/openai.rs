//! (to be written)

use axum::Router;

use crate::server::handlers::AppState;

/// This dialect's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
}
