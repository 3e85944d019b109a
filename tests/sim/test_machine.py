"""A Hypothesis state machine that injects faults into the simulator; the production checker decides."""

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from sim.database import NAMESPACES
from sim.world import Result, World
from ssmd.core.invariants import check
from tests.sim.helpers import describe

# Convergence, no-resurrection and continuity hold once the pipeline is quiet (teardown);
# the rest must hold after every step.
QUIET_ONLY = {"convergence", "no-resurrection", "continuity"}


class SimulatorMachine(RuleBasedStateMachine):
    world: World

    @initialize(seed=st.integers(0, 2**32 - 1))
    def start(self, seed):
        self.world = World(seed)

    @rule(count=st.integers(1, 20))
    def run_steps(self, count):
        for _ in range(count):
            self.world.step(writers=True, faults=False)

    @rule()
    def crash_cache(self):
        if self.world.cache.up:
            self.world.log(self.world.crash_cache())

    @rule()
    def crash_publisher(self):
        if self.world.publisher.up:
            self.world.log(self.world.crash_publisher())

    @rule()
    def drop_slot(self):
        if self.world.db.slot_exists:
            self.world.log(self.world.drop_slot())

    @rule()
    def recreate_stream(self):
        self.world.log(self.world.recreate_stream())

    @rule()
    def poison_message(self):
        if self.world.stream.messages:
            self.world.log(self.world.poison_message())

    @rule(ms=st.integers(1, 200))
    def pass_time(self, ms):
        self.world.tick(ms)

    @invariant()
    def invariants_hold_while_running(self):
        world = self.world
        violations = check(world.database_state(), world.redis.state(), NAMESPACES, world.history())
        running = [violation for violation in violations if violation.invariant not in QUIET_ONLY]
        assert not running, describe(Result(world.seed, world.strategy, running, world.trace))

    def teardown(self):
        world = getattr(self, "world", None)
        if world is None:
            return
        world.quiesce()
        violations = world.check()
        assert not violations, describe(Result(world.seed, world.strategy, violations, world.trace))


SimulatorMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestSimulatorMachine = SimulatorMachine.TestCase
