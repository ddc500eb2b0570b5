//! Eddy's wire contracts: the job API (CLI → coordinator), the cluster API (worker ↔ coordinator)
//! and the data exchange (worker → worker), generated from `proto/eddy.proto`.
#![allow(missing_docs, clippy::all)]

tonic::include_proto!("eddy.v1");
