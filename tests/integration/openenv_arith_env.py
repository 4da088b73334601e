"""An environment in OpenEnv's public format (openenv-core: an `Environment` served by its own
`create_fastapi_app`), for tests/integration/test_openenv_environment.py: two questions "a+b" per
episode drawn from the reset seed; reward 1 for a reply holding any digit (the tiny test model is
not expected to add), done after the second. Each step is logged (episode id, seed, question,
answer, reward) to the JSONL file named by $OPENENV_ARITH_LOG.

    python openenv_arith_env.py PORT
"""

from __future__ import annotations

import json
import os
import random
import sys
from typing import Any

from openenv.core.env_server import Environment, create_fastapi_app
from openenv.core.env_server.types import Action, Observation, State
from pydantic import Field


class Answer(Action):
    answer: str = Field(..., description="The model's reply")


class Question(Observation):
    question: str = ""


class Arith(Environment[Answer, Question, State]):
    SUPPORTS_CONCURRENT_SESSIONS = True
    QUESTIONS = 2

    def __init__(self):
        super().__init__()
        self._state, self.seed, self.questions = State(), None, []

    def reset(self, seed: int | None = None, episode_id: str | None = None, **kwargs: Any) -> Question:
        rng = random.Random(seed)
        self.seed, self.questions = seed, [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(self.QUESTIONS)]
        self._state = State(episode_id=episode_id, step_count=0)
        return Question(question="{}+{}".format(*self.questions[0]))

    def step(self, action: Answer, timeout_s: float | None = None, **kwargs: Any) -> Question:
        i = self._state.step_count
        reward = 1.0 if any(c.isdigit() for c in action.answer) else 0.0
        self._state.step_count += 1
        done = self._state.step_count >= self.QUESTIONS
        with open(os.environ["OPENENV_ARITH_LOG"], "a") as log:
            log.write(json.dumps({"episode_id": self._state.episode_id, "seed": self.seed, "turn": i,
                                  "question": "{}+{}".format(*self.questions[i]), "answer": action.answer,
                                  "reward": reward}) + "\n")
        question = "" if done else "{}+{}".format(*self.questions[self._state.step_count])
        return Question(question=question, reward=reward, done=done)

    @property
    def state(self) -> State:
        return self._state


app = create_fastapi_app(Arith, Answer, Question, max_concurrent_envs=64)

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
