"""The paper's tasks (one module each) and the MPO-versus-pruning protocol that runs them."""
