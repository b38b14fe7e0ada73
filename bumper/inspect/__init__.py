"""The inspection-addon side: finding addons (loading) and running each flow through its rule's
chain (chain). Their API is bumper.addon."""
