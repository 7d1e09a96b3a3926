//! The Tax Administration's certificate service (SOAP 1.1 over HTTPS): requests, responses,
//! their XML signatures, and a stand-in of the service for tests and the demo.
