// Starts Swagger UI on the schema named by the container's data-schema-url. Requests made
// with "Try it out" carry the session's CSRF token so POSTs work for a logged-in user.
(function () {
  "use strict";
  var container = document.getElementById("swagger-ui");
  function csrfToken() {
    var match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : null;
  }
  window.SwaggerUIBundle({
    url: container.dataset.schemaUrl,
    domNode: container,
    deepLinking: true,
    requestInterceptor: function (request) {
      var token = csrfToken();
      if (token) {
        request.headers["X-CSRFToken"] = token;
      }
      return request;
    },
  });
})();
