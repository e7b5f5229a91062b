# Fit each data set in a CSV with flexmix (Gaussian experts y ~ x, multinomial-logit
# concomitant ~ x), starting from the given hard cluster labels. Prints one JSON line
# per replicate: replicate id, log-likelihood, iterations, converged, seconds.
suppressPackageStartupMessages(library(flexmix))
args <- commandArgs(trailingOnly = TRUE)
data <- read.csv(args[1])
k <- as.integer(args[2])
tol <- as.numeric(args[3])
iter_max <- as.integer(args[4])
for (r in sort(unique(data$rep))) {
  d <- data[data$rep == r, ]
  t0 <- proc.time()[["elapsed"]]
  fit <- flexmix(y ~ x, data = d, k = k, cluster = d$cluster,
                 model = FLXMRglm(family = "gaussian"),
                 concomitant = FLXPmultinom(~x),
                 control = list(tolerance = tol, iter.max = iter_max, minprior = 0))
  secs <- proc.time()[["elapsed"]] - t0
  cat(sprintf('{"rep": %d, "loglik": %.12f, "iter": %d, "converged": %s, "k": %d, "seconds": %.6f}\n',
              r, as.numeric(logLik(fit)), fit@iter, tolower(as.character(fit@converged)),
              fit@k, secs))
}
