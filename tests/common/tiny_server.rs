//! An in-process server with the tiny model, resident, for the server tests.

use dreamshaper::server::{Server, ServerConfig};
use dreamshaper::{Pipeline, PipelineOptions, Residency};

pub fn tiny_server(config: ServerConfig) -> Server {
    let model = crate::common::tiny_model();
    Server::start(config, move || {
        Pipeline::load(
            model.to_str().unwrap(),
            PipelineOptions { residency: Residency::Resident, ..Default::default() },
        )
    })
    .unwrap()
}
