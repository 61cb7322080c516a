"""The fleet's Prometheus and Alertmanager alone, on the hosts of inventory group `monitoring`.

    pyinfra -y inventories/prod.py deploys/monitoring.py --limit monitoring

Scrapes every cache of the inventory (hosts whose data leaves `monitoring_scrape` on) on its
cache port and node exporter, evaluates monitoring/rules/nixcache.yml and sends alerts to the
webhook at `alert_webhook_ref`. deploys/cache.py runs the same part on a cache host that is in
group `monitoring` too (the lab's first host); run this file after adding or removing caches,
or for a monitoring host of its own (set `monitoring_scrape = False` in its data). Hosts
outside the group are left alone.
"""

from pyinfra import host

from deploys.parts.monitoring_server import MONITORING_GROUP, monitoring_server

if MONITORING_GROUP in host.groups:
    monitoring_server()
