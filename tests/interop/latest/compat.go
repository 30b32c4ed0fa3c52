package main

// wsRegionDialHonoursDERPPort: since v1.100.0 (commit 04ae61fe4) urlString includes
// ":DERPPort", so a region client's WebSocket path reaches the node's real port and
// WebSocket mode can use the same region client as the TCP modes.
const wsRegionDialHonoursDERPPort = true
