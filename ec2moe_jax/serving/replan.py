"""Re-planning in the end client on live figures: the link it measures (RTT, uplink
throughput) and the load the server reports (Stats: queue, step time), through the
scheduler's own re-planner (:func:`ec2moe_jax.scheduler.replan.make_replanner`, with its
hysteresis). A plan change opens a new session (the client replays its history under the new
split and codec).

Shape legend: M MoE layers, E experts.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ec2moe_jax.pipeline.plans import PipelinePlan, from_scheduler
from ec2moe_jax.scheduler.model import Instance
from ec2moe_jax.scheduler.replan import Observation, make_replanner


class LivePlanner:
    """The client's planner: ``update(link, server)`` -> a new plan or None.

    Args:
      cfg: the model's config.
      template: the one-device scheduling instance of this client (its device, the link
        preset it starts from, the workload, calibrations and codec options:
        :func:`ec2moe_jax.pipeline.plans.instance`).
      hysteresis: relative improvement a new plan needs (the re-planner's margin).
      rate: this client's request rate (requests/s) in the observation.

    The server's measured queue wait per step is added to the cloud's per-job overhead of the
    template, so a busy server makes cloud-heavy plans dearer; the measured RTT and uplink
    throughput replace the link's. Routing statistics stay the template's (the client does not
    observe the cloud layers' routing).
    """

    def __init__(self, cfg, template: Instance, *, hysteresis: float = 0.1,
                 rate: float | None = None):
        self.cfg, self.template, self.hysteresis = cfg, template, hysteresis
        self.rate = np.asarray(template.rate if rate is None else [rate], np.float32)
        rp = make_replanner(template, hysteresis=hysteresis)
        self.state = rp.init()
        self.plan = from_scheduler(self.state.plan, template, cfg, "ec2moe")
        self.moe_rows = np.flatnonzero(np.asarray(template.is_moe) > 0)
        self.changes = 0

    def observation(self, rtt_s: float | None, up_bps: float | None) -> Observation:
        t = self.template
        counts = np.asarray(t.freq)[self.moe_rows]
        return Observation(
            counts=jnp.asarray(counts, jnp.float32),
            link_bps=jnp.asarray(t.link_bps if up_bps is None else [up_bps], jnp.float32),
            rtt=jnp.asarray(t.rtt if rtt_s is None else [rtt_s], jnp.float32),
            rate=jnp.asarray(self.rate))

    def update(self, rtt_s: float | None, up_bps: float | None, queue_s: float = 0.0
               ) -> PipelinePlan | None:
        """One re-planning step on live figures: the measured RTT (s) and uplink throughput
        (bits/s; None keeps the template's), and the server's queue wait per step (s).
        Returns the new plan when the re-planner switches, else None."""
        t = self.template
        live = t.replace(cloud_overhead=t.cloud_overhead + np.float32(queue_s))
        rp = make_replanner(live, hysteresis=self.hysteresis)
        plan, self.state = rp.update(self.observation(rtt_s, up_bps), self.state)
        new = from_scheduler(plan, live, self.cfg, "ec2moe")
        if (new.split, new.codec, new.resident) == (self.plan.split, self.plan.codec,
                                                    self.plan.resident):
            return None
        self.plan, self.changes = new, self.changes + 1
        return new
