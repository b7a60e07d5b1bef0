// The login page: shows why the previous attempt failed (the backend redirects a refused
// login to /login?error=<reason>). The form itself is a plain POST to /login, no script
// needed; this file imports nothing, since there is no session yet.

const MESSAGES = {
  // One message for any wrong factor: the server does not say which one was wrong.
  refused: 'Login refused: check your operator name, password and one-time code.',
  rate_limited: 'Too many login attempts: wait a minute and try again.',
  unavailable: 'The trustmesh server cannot be reached right now: try again shortly.',
  csrf: 'The login form expired: it has been reloaded, please try again.',
  expired: 'Your console session ended: log in again.',
};

const reason = new URLSearchParams(window.location.search).get('error');
const box = document.getElementById('login-error');
if (reason && box) {
  box.textContent = Object.prototype.hasOwnProperty.call(MESSAGES, reason)
    ? MESSAGES[reason]
    : 'Login failed: try again.';
}

const form = document.getElementById('login-form');
if (form) {
  form.addEventListener('submit', () => {
    // After the browser has taken the form's values: guard against a double submission.
    const button = document.getElementById('login-submit');
    window.setTimeout(() => { if (button) button.disabled = true; }, 0);
  });
}

// Coming back to this page (history, bfcache): the button works again.
window.addEventListener('pageshow', () => {
  const button = document.getElementById('login-submit');
  if (button) button.disabled = false;
});
