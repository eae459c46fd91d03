"""Request and response schemas of the HTTP API: one module per resource, one request and one
response model per operation."""
