//! The Tax Administration's certificate service (SOAP 1.1 over HTTPS): requests, responses,
//! their XML signatures, and a stand-in of the service for tests and the demo.
//!
//! The flows the CLI and the running proxy share are in [`flow`]: [`request`] (first
//! retrieval with transfer IDs), [`renew`] (signed with the identity in service) and
//! [`resume`] (finish a retrieval the service already accepted).

pub mod answer;
pub mod client;
pub mod dsig;
pub mod flow;
pub mod keys;
pub mod standin;
pub mod xml;

pub use crate::business_id::BusinessId;
pub use client::{PollSchedule, Service, ServiceError};
pub use flow::{
    customer_of, prepare_out, renew, renewable, request, resume, FlowError, Issued, Transfer,
};
pub use xml::Customer;
