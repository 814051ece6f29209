"""`carelake gateway`: HL7 v2 over MLLP and FHIR / device readings over HTTP into the landing zone."""
