"""bumper's engine on mitmproxy: the master and its hook dispatcher, the layers, and the mitmproxy
addons that hold each connection's state, apply the policy, serve mimics and answer clients."""
