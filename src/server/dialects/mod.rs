//! The API dialects the server speaks besides the hosted v1 endpoints, all served from the one queue: the hosted
//! service's v2 submit-and-poll job API ([`hosted_v2`]), AUTOMATIC1111's `/sdapi/v1/*` ([`a1111`]) and OpenAI's image
//! API ([`openai`]). Each file owns its routes, request mapping, answers and error shapes; adding a dialect is one
//! file and one line in [`routes`].

pub mod a1111;
pub mod hosted_v2;
pub mod openai;

use axum::Router;

use super::handlers::AppState;

/// Every dialect's routes.
pub fn routes() -> Router<AppState> {
    Router::new().merge(hosted_v2::routes()).merge(a1111::routes()).merge(openai::routes())
}
