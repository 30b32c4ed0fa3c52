package main

// wsRegionDialHonoursDERPPort: in v1.82.5 a region client's WebSocket path dials
// urlString(Nodes[0]) = "https://HostName/derp", dropping DERPPort (so it always goes to
// port 443). WebSocket mode therefore uses derphttp.NewClient with an explicit URL.
const wsRegionDialHonoursDERPPort = false
